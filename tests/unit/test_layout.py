"""The package layout keeps its one-way imports (issue #14).

Every ``import``/``from ... import`` in ``pipeline/`` — at module level or inside a
function — is read with ``ast``, and each edge between two of pipeline's packages must be
allowed below. The core (config, storage, run, ray, cluster, jobs, progress, tracking) uses nothing above it; the
ASR library uses data and the core; stages use the libraries but not each other; only the
demo and the CLI (the entry point) may use the demo.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"

CORE = "core"
# what each kind of code may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    CORE: set(),
    "data": {CORE},
    "asr": {CORE, "data"},
    "serving": {CORE, "data"},
    "stages": {CORE, "data", "asr", "serving"},
    "airflow": {CORE, "data", "asr"},
    "demo": {CORE, "data", "asr", "serving", "stages"},
    "cli": {CORE, "data", "asr", "serving", "stages", "demo"},
}
# packaged alone (into the TorchServe .mar, into each MLflow model): import nothing of pipeline
SELF_CONTAINED = {"pipeline.serving.handler", "pipeline.serving.pyfunc_model"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _kind(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return CORE  # the package itself
    if parts[1] in ALLOWED:
        return parts[1]
    return CORE  # pipeline.config, .storage, .run, .ray, .cluster, .jobs, .progress, .tracking


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "pipeline"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != "pipeline":
                continue
            # ``from pipeline.stages import gate`` imports the submodule pipeline.stages.gate
            found += [(node.lineno, f"{name}.{a.name}" if name.count(".") < 2 else name) for a in node.names]
    return found


MODULES = sorted(p for p in PIPELINE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    me = _module_name(path)
    kind = _kind(me)
    bad = []
    for line, target in _imports(path):
        if me in SELF_CONTAINED:
            bad.append(f"line {line}: {target} (this file is packaged alone and must import nothing of pipeline)")
            continue
        other = _kind(target)
        if other == kind:
            if kind == "stages" and target.split(".")[2] != me.split(".")[2] and len(me.split(".")) > 2:
                bad.append(f"line {line}: {target} (a stage does not import another stage)")
            continue
        if other not in ALLOWED[kind]:
            bad.append(f"line {line}: {target} ({kind} may not import {other})")
    assert not bad, f"{me}:\n  " + "\n  ".join(bad)


def test_every_module_is_in_a_known_kind():
    top = {p.stem if p.is_file() else p.name for p in PIPELINE.iterdir() if p.name != "__pycache__"}
    known = set(ALLOWED) | {"__init__", "config", "storage", "run", "ray", "cluster", "jobs", "progress", "tracking"}
    assert top <= known, f"unplaced modules under pipeline/: {sorted(top - known)}"


def test_dag_tasks_import_their_own_stage_module():
    """Each stage task of the DAG imports ``pipeline.stages.<its task id>``."""
    from pipeline.run import STAGES

    tree = ast.parse((ROOT / "dags" / "asr_weekly_retune.py").read_text())
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name not in STAGES:
            continue
        stage_imports = {a.name for n in ast.walk(node) if isinstance(n, ast.ImportFrom)
                         and n.module == "pipeline.stages" for a in n.names}
        assert stage_imports == {node.name}, f"task {node.name} imports pipeline.stages {sorted(stage_imports)}"
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert set(STAGES) <= defined


def _declared_distributions() -> set[str]:
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_third_party_import_is_declared():
    """A package our code imports is a dependency of ours, not something another one happens to pull in."""
    import sys
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    declared = _declared_distributions()
    if "apache-airflow" in declared:  # the meta-package: `airflow` is installed by its core and task-sdk
        declared |= {"apache-airflow-core", "apache-airflow-task-sdk"}
    missing = {}
    for path in [*PIPELINE.rglob("*.py"), *(ROOT / "dags").glob("*.py"), *(ROOT / "plugins").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "pipeline" or top not in owners:
                    continue
                dists = {d.lower().replace("_", "-") for d in owners[top]}
                if not dists & declared:
                    missing.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
