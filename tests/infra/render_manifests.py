"""Render a kustomization to one multi-document YAML stream, without a cluster.

Uses ``kubectl kustomize`` (or a ``kustomize`` binary) when one is on PATH. Without either,
falls back to collecting the files the kustomization lists under ``resources:`` (recursing
into sub-kustomizations) so that every manifest is still validated one by one; generators
and transformers (configMapGenerator, images, labels) are then not applied, and the
output says so on stderr.

    python tests/infra/render_manifests.py infra/k8s/base [-o rendered.yaml]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no kustomization.yaml in {directory}")


def render_with_binary(directory: Path) -> str | None:
    """Render with kubectl kustomize / kustomize build; None when neither is installed."""
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(directory)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(directory)]
    else:
        return None
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def collect_files(directory: Path) -> list[Path]:
    """The resource files of a kustomization, in order, sub-kustomizations expanded."""
    spec = yaml.safe_load(_kustomization_file(directory).read_text(encoding="utf-8")) or {}
    files: list[Path] = []
    for entry in spec.get("resources", []) or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            files.extend(collect_files(path))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{directory}: resource {entry!r} does not exist")
    return files


def check_generator_files(directory: Path) -> None:
    """The files that configMapGenerator/secretGenerator name exist (kustomize would fail)."""
    spec = yaml.safe_load(_kustomization_file(directory).read_text(encoding="utf-8")) or {}
    for gen in (spec.get("configMapGenerator") or []) + (spec.get("secretGenerator") or []):
        for entry in gen.get("files", []) or []:
            src = entry.split("=", 1)[-1]
            if not (directory / src).is_file():
                raise FileNotFoundError(f"{directory}: generator {gen.get('name')!r} file {src!r} does not exist")


def render_fallback(directory: Path) -> str:
    check_generator_files(directory)
    parts = []
    for f in collect_files(directory):
        text = f.read_text(encoding="utf-8").strip()
        if text.startswith("---"):
            text = text[3:].lstrip("\n")
        parts.append(text)
    return "\n---\n".join(parts) + "\n"


def render(directory: str | Path) -> tuple[str, str]:
    """Return (yaml_text, how) where how is 'kustomize' or 'files'."""
    directory = Path(directory)
    text = render_with_binary(directory)
    if text is not None:
        return text, "kustomize"
    return render_fallback(directory), "files"


def load_documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kustomization_dir")
    ap.add_argument("-o", "--output", help="write here instead of stdout")
    args = ap.parse_args(argv)
    try:
        text, how = render(args.kustomization_dir)
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"render_manifests: {exc}", file=sys.stderr)
        return 1
    if how == "files":
        print(
            "render_manifests: no kubectl/kustomize on PATH; validating the listed resource files "
            "one by one (generators and transformers not applied)",
            file=sys.stderr,
        )
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
