"""tools/lint.sh passes, and each validator it runs rejects a deliberately broken input."""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT.parent / "shared" / "schemas" / "crds"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, check=False, **kw)


def test_lint_script_passes(lint_bin):
    t0 = time.monotonic()
    proc = run(["bash", "tools/lint.sh"], timeout=900)
    took = time.monotonic() - t0
    assert proc.returncode == 0, f"tools/lint.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "all validators passed" in proc.stdout
    # Every validator ran and passed (none silently left out of the summary).
    summary = proc.stdout.split("=== summary")[-1].splitlines()
    for step in ("hadolint", "shellcheck", "yamllint", "render", "kubernetes-validate", "validate_crds", "checkov"):
        assert any(line.strip().startswith("ok") and step in line for line in summary), (step, summary)
    assert took < 180, f"lint took {took:.0f}s; keep it under 3 minutes"


# --- the validators bite --------------------------------------------------------------------


def _write_docs(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return path


def _crd_check(lint_bin: Path, path: Path) -> subprocess.CompletedProcess:
    return run([lint_bin / "python", "tests/infra/validate_crds.py", "--crd-dir", CRD_DIR, path])


def _one(manifests: list[dict], kind: str) -> dict:
    found = [d for d in manifests if d.get("kind") == kind]
    assert found, f"no {kind} in infra/k8s/base"
    return copy.deepcopy(found[0])


def test_real_custom_resources_pass(lint_bin, manifests, tmp_path):
    docs = [d for d in manifests if d["kind"] in ("RayCluster", "VirtualService", "DestinationRule")]
    assert len(docs) == 3
    proc = _crd_check(lint_bin, _write_docs(tmp_path / "ok.yaml", docs))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 custom resource(s) checked, 0 failed" in proc.stdout


def test_raycluster_missing_required_field_is_caught(lint_bin, manifests, tmp_path):
    ray = _one(manifests, "RayCluster")
    del ray["spec"]["headGroupSpec"]
    proc = _crd_check(lint_bin, _write_docs(tmp_path / "bad.yaml", [ray]))
    assert proc.returncode == 1
    assert "$.spec: 'headGroupSpec' is a required property" in proc.stdout


def test_raycluster_misspelt_field_is_caught(lint_bin, manifests, tmp_path):
    ray = _one(manifests, "RayCluster")
    group = ray["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")
    proc = _crd_check(lint_bin, _write_docs(tmp_path / "bad.yaml", [ray]))
    assert proc.returncode == 1
    assert "'minReplica' was unexpected" in proc.stdout
    assert "'minReplicas' is a required property" in proc.stdout


def test_raycluster_pod_template_is_checked_strictly(lint_bin, manifests, tmp_path):
    ray = _one(manifests, "RayCluster")
    container = ray["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    ray["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # must be a string
    proc = _crd_check(lint_bin, _write_docs(tmp_path / "bad.yaml", [ray]))
    assert proc.returncode == 1
    assert "containers[0]: Additional properties are not allowed ('resource' was unexpected)" in proc.stdout
    assert "rayStartParams.num-gpus: 1 is not of type 'string'" in proc.stdout


def test_virtualservice_bad_weight_and_typo_are_caught(lint_bin, manifests, tmp_path):
    vs = _one(manifests, "VirtualService")
    route = vs["spec"]["http"][0]["route"]
    route[1]["weight"] = "5%"
    route[0]["destination"]["subnet"] = route[0]["destination"].pop("subset")
    proc = _crd_check(lint_bin, _write_docs(tmp_path / "bad.yaml", [vs]))
    assert proc.returncode == 1
    assert "route[1].weight: '5%' is not of type 'integer'" in proc.stdout
    assert "'subnet' was unexpected" in proc.stdout


def test_destinationrule_without_host_is_caught(lint_bin, manifests, tmp_path):
    dr = _one(manifests, "DestinationRule")
    del dr["spec"]["host"]
    dr["metadata"]["nmae"] = "typo"
    proc = _crd_check(lint_bin, _write_docs(tmp_path / "bad.yaml", [dr]))
    assert proc.returncode == 1
    assert "'host' is a required property" in proc.stdout
    assert "'nmae' was unexpected" in proc.stdout


def test_unknown_custom_kind_and_unserved_version_are_refused(lint_bin, manifests, tmp_path):
    ray = _one(manifests, "RayCluster")
    ray["apiVersion"] = "ray.io/v9"
    other = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "x"}}
    proc = _crd_check(lint_bin, _write_docs(tmp_path / "bad.yaml", [ray, other]))
    assert proc.returncode == 1
    assert "ray.io/v9 is not a served version" in proc.stdout
    assert "no CRD schema for Widget" in proc.stdout


def test_kubernetes_validate_strict_catches_typo_in_builtin_kind(lint_bin, manifests, tmp_path):
    dep = next(copy.deepcopy(d) for d in manifests if d["kind"] == "Deployment")
    dep["spec"]["replica"] = dep["spec"].pop("replicas")
    bad = _write_docs(tmp_path / "bad.yaml", [dep])
    proc = run([lint_bin / "kubernetes-validate", "--strict", "--quiet", "-k", "1.34.0", bad])
    assert proc.returncode != 0
    assert "replica" in proc.stdout + proc.stderr


def test_hadolint_catches_latest_and_unpinned(lint_bin, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD [\"python\"]\n", encoding="utf-8")
    proc = run([lint_bin / "hadolint", "--config", ".hadolint.yaml", bad])
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # latest
    assert "DL3013" in proc.stdout  # unpinned pip package


def _checkov(lint_bin: Path, folder: Path, framework: str) -> subprocess.CompletedProcess:
    """checkov exactly as tools/lint.sh runs it: JSON report, then tests/infra/checkov_summary.py."""
    report = folder / "checkov.json"
    with report.open("w") as out:
        subprocess.run(
            [str(lint_bin / "checkov"), "--config-file", ".checkov.yaml", "-d", str(folder), "--framework", framework, "-o", "json"],
            stdout=out, stderr=subprocess.DEVNULL, cwd=ROOT, check=False,
        )
    return run([lint_bin / "python", "tests/infra/checkov_summary.py", report])


def test_checkov_catches_root_dockerfile_without_healthcheck(lint_bin, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM python:3.11.11-slim-bookworm\nCMD [\"python\"]\n", encoding="utf-8")
    proc = _checkov(lint_bin, tmp_path, "dockerfile")
    assert proc.returncode == 1
    assert "FAIL CKV_DOCKER_2" in proc.stdout and "FAIL CKV_DOCKER_3" in proc.stdout


def test_checkov_catches_unversioned_bucket_and_unpinned_pod(lint_bin, tmp_path):
    (tmp_path / "main.tf").write_text('resource "aws_s3_bucket" "b" {\n  bucket = "x"\n}\n', encoding="utf-8")
    proc = _checkov(lint_bin, tmp_path, "terraform")
    assert proc.returncode == 1
    assert "FAIL CKV_AWS_21" in proc.stdout  # versioning
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "x"},
           "spec": {"containers": [{"name": "c", "image": "python:latest"}]}}
    k8s = tmp_path / "k8s"
    k8s.mkdir()
    _write_docs(k8s / "pod.yaml", [pod])
    proc = _checkov(lint_bin, k8s, "kubernetes")
    assert proc.returncode == 1
    assert "FAIL CKV_K8S_14" in proc.stdout  # image tag latest
    assert "FAIL CKV_K8S_20" in proc.stdout  # privilege escalation allowed


def test_yamllint_catches_duplicate_keys(lint_bin, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  root: a\n  root: b\n", encoding="utf-8")
    proc = run([lint_bin / "yamllint", "--strict", "-c", ".yamllint", bad])
    assert proc.returncode != 0
    assert "duplication of key" in proc.stdout
