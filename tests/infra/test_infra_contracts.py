"""Contracts between infra/, docker/, the pipeline's configuration and the canary router.

Schema validity is tools/lint.sh's job; these tests check what a schema cannot: that the
pieces name each other correctly (the Istio objects the router patches, the services the
production config points at, the IRSA roles Terraform creates), and the security baseline
of every pod, including the RayCluster's, which checkov does not inspect.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
NS = "asr-retune"


def by_kind(manifests: list[dict], kind: str) -> list[dict]:
    return [d for d in manifests if d.get("kind") == kind]


def find(manifests: list[dict], kind: str, name: str, namespace: str | None = None) -> dict:
    for d in by_kind(manifests, kind):
        meta = d["metadata"]
        if meta["name"] == name and (namespace is None or meta.get("namespace") == namespace):
            return d
    raise AssertionError(f"{kind} {namespace}/{name} not in infra/k8s/base")


def pod_templates(manifests: list[dict]):
    """(owner, pod template) for every workload, RayCluster head and worker groups included."""
    for d in manifests:
        ident = f"{d['kind']} {d['metadata'].get('namespace')}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield ident, d["spec"]["template"]
        elif d["kind"] == "RayCluster":
            yield f"{ident} head", d["spec"]["headGroupSpec"]["template"]
            for g in d["spec"].get("workerGroupSpecs", []):
                yield f"{ident} {g['groupName']}", g["template"]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- the canary the pipeline drives (#7) -----------------------------------------------------


def test_virtualservice_is_what_the_router_patches(manifests):
    vs = find(manifests, "VirtualService", "asr-torchserve", NS)
    http = vs["spec"]["http"]
    assert len(http) == 1, "the router patches spec.http[0]"
    route = http[0]["route"]
    assert [r["destination"]["subset"] for r in route] == ["production", "canary"]
    weights = [r["weight"] for r in route]
    assert all(isinstance(w, int) for w in weights) and sum(weights) == 100
    assert weights == [100, 0], "at rest all traffic goes to production"
    hosts = {r["destination"]["host"] for r in route}
    assert hosts == {f"asr-torchserve.{NS}.svc.cluster.local"} == set(vs["spec"]["hosts"])


def test_destinationrule_subsets_select_exactly_one_deployment_each(manifests):
    dr = find(manifests, "DestinationRule", "asr-torchserve", NS)
    assert dr["spec"]["host"] == f"asr-torchserve.{NS}.svc.cluster.local"
    subsets = {s["name"]: s["labels"] for s in dr["spec"]["subsets"]}
    assert set(subsets) == {"production", "canary"}
    deployments = [d for d in by_kind(manifests, "Deployment") if d["metadata"]["namespace"] == NS]
    service = find(manifests, "Service", "asr-torchserve", NS)
    for name, labels in subsets.items():
        owners = [d["metadata"]["name"] for d in deployments if selects(labels, d["spec"]["template"]["metadata"]["labels"])]
        assert owners == [f"torchserve-{name}"], (name, owners)
        # The one Service in front of both tracks selects this subset's pods too.
        dep = find(manifests, "Deployment", f"torchserve-{name}", NS)
        assert selects(service["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    assert find(manifests, "Deployment", "torchserve-canary", NS)["spec"]["replicas"] == 0


def test_canary_router_rbac_covers_exactly_its_objects(manifests):
    role = find(manifests, "Role", "asr-canary-router", NS)
    rules = {(r["apiGroups"][0], res): r for r in role["rules"] for res in r["resources"]}
    vs_rule = rules[("networking.istio.io", "virtualservices")]
    assert vs_rule["resourceNames"] == ["asr-torchserve"] and "patch" in vs_rule["verbs"]
    assert set(rules[("apps", "deployments")]["resourceNames"]) == {"torchserve-production", "torchserve-canary"}
    assert all("*" not in r["verbs"] and "delete" not in r["verbs"] for r in role["rules"])
    binding = find(manifests, "RoleBinding", "asr-canary-router", NS)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "airflow-worker", "namespace": "airflow"}]


# --- the Ray cluster ------------------------------------------------------------------------


def test_raycluster_cpu_head_and_autoscaling_spot_gpu_workers(manifests, root):
    ray = find(manifests, "RayCluster", "asr-retune-ray", "ray")
    spec = ray["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    pin = re.search(r'"ray\[[a-z,]*tune[a-z,]*\]==([\d.]+)"', (root / "pyproject.toml").read_text()).group(1)
    assert spec["rayVersion"] == pin, "the cluster's Ray must equal the client's"
    docker_from = re.search(r"^FROM (\S+)", (root / "docker/pipeline/Dockerfile").read_text(), re.M).group(1)
    assert docker_from == f"rayproject/ray:{pin}-py311-gpu"

    head = spec["headGroupSpec"]
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {})
    assert head["rayStartParams"]["num-cpus"] == "0"

    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu) == 1
    g = gpu[0]
    assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1
    pod = g["template"]["spec"]
    assert pod["nodeSelector"].get("eks.amazonaws.com/capacityType") == "SPOT"
    tolerated = {t["key"] for t in pod["tolerations"]}
    assert {"spot", "nvidia.com/gpu"} <= tolerated
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"


# --- every pod: non-root, least privilege, bounded ---------------------------------------


def test_every_pod_is_non_root_bounded_and_pinned(manifests):
    templates = list(pod_templates(manifests))
    assert len(templates) >= 6  # mlflow, 2x torchserve, ray head + 2 worker groups
    for owner, tpl in templates:
        spec = tpl["spec"]
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, owner
        assert psc.get("runAsUser", 0) != 0, owner
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", owner
        assert spec.get("serviceAccountName"), f"{owner}: no default service account"
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (owner, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (owner, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (owner, c["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(kind, {})), (owner, c["name"], kind)
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (owner, image)
            assert c.get("livenessProbe") and c.get("readinessProbe"), (owner, c["name"])


def test_no_secret_values_in_manifests(manifests):
    assert not by_kind(manifests, "Secret"), "Secrets are created out of band, never committed"
    secretish = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
    for owner, tpl in pod_templates(manifests):
        for c in tpl["spec"]["containers"]:
            for env in c.get("env", []):
                if secretish.search(env["name"]) and env["name"] != "TS_DISABLE_TOKEN_AUTHORIZATION":
                    assert "value" not in env, f"{owner}: {env['name']} has a literal value"


def test_no_credentials_anywhere_in_docker_or_infra(root):
    patterns = [re.compile(p) for p in (r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----", r"aws_secret_access_key\s*=\s*\S{20,}")]
    for folder in ("docker", "infra"):
        for f in (root / folder).rglob("*"):
            if f.is_file() and f.suffix not in (".png",):
                text = f.read_text(encoding="utf-8", errors="replace")
                for p in patterns:
                    assert not p.search(text), f"{f}: looks like a credential ({p.pattern})"


def test_service_accounts_carry_irsa_roles_that_terraform_creates(manifests, root):
    variables = (root / "infra/terraform/variables.tf").read_text()
    block = variables[variables.index('variable "service_accounts"'):]
    tf_sas = dict(re.findall(r'^\s+(\w+)\s+=\s+(\[[^\]]*\])', block.split("default = {", 1)[1].split("}", 1)[0], re.M))
    tf_sas = {k: yaml.safe_load(v) for k, v in tf_sas.items()}
    roles_by_sa = {sa: f"asr-retune-{comp.replace('_', '-')}" for comp, sas in tf_sas.items() for sa in sas}

    for sa in by_kind(manifests, "ServiceAccount"):
        key = f"{sa['metadata']['namespace']}/{sa['metadata']['name']}"
        arn = sa["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
        assert key in roles_by_sa, f"{key} has no IRSA role in infra/terraform"
        assert arn.endswith(f":role/{roles_by_sa[key]}"), (key, arn)

    values = yaml.safe_load((root / "infra/helm/airflow-values.yaml").read_text())
    for component in ("workers", "scheduler", "apiServer", "dagProcessor", "triggerer"):
        sa = values[component]["serviceAccount"]
        key = f"airflow/{sa['name']}"
        assert key in roles_by_sa, key
        assert sa["annotations"]["eks.amazonaws.com/role-arn"].endswith(f":role/{roles_by_sa[key]}")


def test_airflow_helm_values(root):
    values = yaml.safe_load((root / "infra/helm/airflow-values.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor"
    assert values["dags"]["gitSync"]["enabled"] is False and values["dags"]["persistence"]["enabled"] is False
    assert values["images"]["airflow"]["repository"].endswith("/asr-retune/airflow")
    assert values["postgresql"]["enabled"] is False
    assert values["data"]["metadataSecretName"] and values["fernetKeySecretName"]
    text = (root / "infra/helm/airflow-values.yaml").read_text()
    assert not re.search(r"^\s*(password|fernetKey|connection)\s*:\s*\S", text, re.M | re.I), "no literal secrets"


# --- the pipeline's configuration names these services ----------------------------------


def _service_host(manifests: list[dict], host: str) -> tuple[str, str]:
    m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", host)
    assert m, f"{host} is not an in-cluster service name"
    return m.group(1), m.group(2)


def test_cluster_config_loads_and_points_at_these_services(manifests, root):
    cfg = load_config(root / "infra/k8s/base/config/asr-retune.yaml", environ={})

    assert cfg.ray.submit == "job" and cfg.ray.address == "auto"
    ray = urlparse(cfg.ray.dashboard_url)
    assert ray.scheme == "http" and ray.port == 8265
    name, ns = _service_host(manifests, ray.hostname)
    cluster = find(manifests, "RayCluster", "asr-retune-ray", ns)
    assert cluster["spec"]["headGroupSpec"]["headService"]["metadata"]["name"] == name
    ports = {p["containerPort"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ray.port in ports

    ml = urlparse(cfg.mlflow.tracking_uri)
    name, ns = _service_host(manifests, ml.hostname)
    svc = find(manifests, "Service", name, ns)
    assert ml.port in {p["port"] for p in svc["spec"]["ports"]}
    env = {e["name"]: e.get("value") for e in find(manifests, "Deployment", "mlflow", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == cfg.mlflow.artifact_root
    assert ml.hostname in env["MLFLOW_ALLOWED_HOSTS"].split(",")

    bucket = urlparse(cfg.storage.root).netloc
    tf_bucket = re.search(r'variable "bucket_name".*?default\s*=\s*"([^"]+)"', (root / "infra/terraform/variables.tf").read_text(), re.S).group(1)
    assert bucket == tf_bucket
    for d in by_kind(manifests, "Deployment"):
        for e in d["spec"]["template"]["spec"]["containers"][0].get("env", []):
            if str(e.get("value", "")).startswith("s3://"):
                assert urlparse(e["value"]).netloc == bucket, (d["metadata"]["name"], e)

    # The generated ConfigMaps carry exactly this file (when kustomize rendered them).
    for cm in by_kind(manifests, "ConfigMap"):
        if cm["metadata"]["name"] == "asr-retune-config":
            assert yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load((root / "infra/k8s/base/config/asr-retune.yaml").read_text())


def test_production_example_names_the_same_services(root):
    cluster = load_config(root / "infra/k8s/base/config/asr-retune.yaml", environ={})
    example = load_config(root / "configs/production.example.yaml", environ={})
    assert example.storage.root == cluster.storage.root
    assert example.ray.address == cluster.ray.address
    assert example.mlflow.tracking_uri == cluster.mlflow.tracking_uri
    assert example.mlflow.artifact_root == cluster.mlflow.artifact_root


# --- docker/ -------------------------------------------------------------------------------


def _compose(root: Path) -> dict:
    return yaml.safe_load((root / "docker/compose.yaml").read_text())


def test_compose_config_loads_and_points_at_compose_services(root):
    compose = _compose(root)
    cfg = load_config(root / "docker/asr-retune.compose.yaml", environ={})
    services = compose["services"]
    for uri in (cfg.ray.address, cfg.mlflow.tracking_uri, cfg.storage.s3_endpoint_url):
        assert urlparse(uri).hostname in services, uri
    assert cfg.storage.root.startswith("s3://")


def test_compose_stack_shape_and_hygiene(root):
    compose = _compose(root)
    services = compose["services"]
    for needed in ("postgres", "s3", "mlflow", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                   "ray-head", "ray-worker", "torchserve", "nginx"):
        assert needed in services, needed
    dockerfile_health = {
        f"docker/{p.parent.name}/Dockerfile" for p in (root / "docker").glob("*/Dockerfile") if "HEALTHCHECK" in p.read_text()
    }
    example = (root / "docker/.env.example").read_text()
    defined = set(re.findall(r"^([A-Z0-9_]+)=", example, re.M))
    raw = (root / "docker/compose.yaml").read_text()
    for var in set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}", raw)):
        assert var in defined, f"{var} used in compose.yaml but missing from docker/.env.example"
    for name, svc in services.items():
        one_shot = svc.get("restart") == "no"
        has_health = "healthcheck" in svc and not svc["healthcheck"].get("disable")
        built_from = svc.get("build", {}).get("dockerfile")
        image_health = built_from in dockerfile_health or any(
            other.get("image") == svc.get("image") and other.get("build", {}).get("dockerfile") in dockerfile_health
            for other in services.values()
        )
        assert one_shot or has_health or image_health, f"{name}: no health check"
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} must bind 127.0.0.1"
        env = svc.get("environment", {}) or {}
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|FERNET|KEY", key) and "ENDPOINT" not in key and "FILE" not in key:
                assert str(value).startswith("${"), f"{name}: {key} must come from docker/.env"


def test_env_file_is_an_example_only(root):
    example = (root / "docker/.env.example").read_text()
    for line in example.splitlines():
        if re.match(r"^[A-Z0-9_]*(PASSWORD|SECRET|FERNET_KEY|ACCESS_KEY)[A-Z0-9_]*=", line):
            assert line.endswith("=CHANGE_ME"), line
    assert not (root / "docker/.env").exists() or "docker/.env" not in _tracked(root)


def _tracked(root: Path) -> str:
    import subprocess

    return subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=False).stdout


@pytest.mark.parametrize("name", ["pipeline", "airflow", "torchserve", "mlflow"])
def test_dockerfile_basics(root, name):
    path = root / "docker" / name / "Dockerfile"
    text = path.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms, path
    for image in froms:
        tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{path}: base image {image} is not pinned"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:"), f"{path}: runs as root"
    assert re.search(r"^HEALTHCHECK\s", text, re.M), f"{path}: no HEALTHCHECK"
    assert not re.search(r"^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN|ACCESS_KEY)", text, re.M), f"{path}: secret in image"
    # Everything COPY'd from the build context (the project root) exists: docker build cannot run here.
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (root / src).exists(), f"{path}: COPY source {src} does not exist"
    assert (path.parent / "Dockerfile.dockerignore").exists(), f"{path}: no Dockerfile.dockerignore beside it"
