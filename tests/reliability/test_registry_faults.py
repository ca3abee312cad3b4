"""Reliability scenario 4: the MLflow server goes down during registration.

A real ``mlflow server`` (SQLite store, proxied artifacts) behind the fault proxy of
tests/support/faultproxy.py, which makes the server vanish at a chosen request: before the stage,
in the middle of uploading the model's artifacts, or right after the model version was
created. Each time the stage must fail, move no alias, leave no half-registered version,
and the retried stage (as Airflow's retry would run it, once the server is back) must end
with exactly one complete version behind ``challenger``. One case kills the server
process itself and restarts it.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest
from support.faultproxy import FaultProxy
from support.mlflow_server import MlflowServer
from support.model_factory import export_tiny
from support.registry_env import put_candidate, registry_config

from pipeline import tracking
from pipeline.run import RunContext
from pipeline.stages.register import register
from pipeline.storage import sha256_file

pytestmark = pytest.mark.integration

MODEL_ARTIFACT_PUT = ("PUT", "/models/m-")  # a file of the logged model (its other files not yet uploaded)
VERSION_CREATE = ("POST", "/model-versions/create")
EXPERIMENT = "asr-retune-faults"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-faults")).start()
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("model") / "mute.pt", "mute")


@pytest.fixture
def proxy(server):
    p = FaultProxy(server.url)
    p.url = p.start()
    yield p
    p.stop()


@pytest.fixture
def fast_failing_client(monkeypatch):
    """The stage gives up at once instead of riding the outage out with MLflow's own retries (7, backoff 2 s)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("ASR_RETUNE_ACTOR", "pytest")


def _run(tmp_path: Path, url: str, name: str, model: Path) -> RunContext:
    """A pipeline run (its own id, its own registered model) whose gate passed."""
    config = registry_config(url, tmp_path / "cache", name=name, experiment=EXPERIMENT)
    ctx = RunContext.create(config, run_id=f"week-{name}", root=str(tmp_path / "store"))
    put_candidate(ctx, model)
    ctx.store.put_text(ctx.stage_key("gate", "decision.json"), json.dumps({
        "passed": True, "forced": False, "cold_start": True, "mode": "improve", "failing_rules": [], "rules": [],
        "candidate": {"key": ctx.stage_key("train", "model.pt"), "sha256": sha256_file(model), "wer": 0.1},
        "golden": {"version": "v1"}, "production": None,
    }))  # fmt: skip
    return ctx


def _state(server_url: str, name: str) -> dict:
    """What the registry holds, read straight from the server (not through the proxy)."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=server_url, registry_uri=server_url)
    try:
        aliases = dict(c.get_registered_model(name).aliases)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        aliases = {}
    versions = c.search_model_versions(f"name = '{name}'")
    complete = []
    for v in versions:
        model_id = v.model_id or (v.source[len("models:/"):] if v.source.startswith("models:/m-") else None)
        source = c.get_logged_model(model_id) if model_id else None
        complete.append(v.status == "READY" and v.tags.get(tracking.TAG_SHA256) is not None
                        and source is not None and str(source.status.value) == "READY")  # fmt: skip
    return {"aliases": aliases, "versions": sorted(v.version for v in versions), "complete": complete}


def _pending_logged_models(server_url: str, ctx: RunContext) -> list[str]:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=server_url)
    exp = c.get_experiment_by_name(EXPERIMENT)
    models = c.search_logged_models(experiment_ids=[exp.experiment_id]) if exp else []
    runs = {r.info.run_id for r in c.search_runs([exp.experiment_id], f"tags.asr_run_id = '{ctx.run_id}'")} if exp else set()
    return [m.model_id for m in models if m.source_run_id in runs and str(m.status.value) != "READY"]


@pytest.mark.scenario(4, expected="MLflow down at the stage's start, mid artifact upload, or right after the version "
                                   "was created: the stage fails, no alias moves, no half-registered version; the "
                                   "retry registers exactly one complete version")
@pytest.mark.parametrize("outage", ["at-start", "mid-upload", "after-version-created"])
def test_outage_during_registration(outage, server, proxy, model, tmp_path, fast_failing_client, observe):
    name = f"asr-{uuid.uuid4().hex[:8]}"
    ctx = _run(tmp_path, proxy.url, name, model)
    if outage == "at-start":
        proxy.down = True
    else:
        method, part = MODEL_ARTIFACT_PUT if outage == "mid-upload" else VERSION_CREATE
        proxy.down_after = lambda m, p: m == method and part in p

    with pytest.raises(Exception) as err:  # noqa: B017  (MLflow raises its own exception types)
        register(ctx)
    assert not isinstance(err.value, AssertionError)
    assert proxy.down, "the outage never happened"
    failed = _state(server.url, name)
    assert not ctx.is_complete("register")
    assert failed["aliases"] == {}  # no alias moved
    assert all(failed["complete"]), failed  # nothing half-registered
    assert failed["versions"] == (["1"] if outage == "after-version-created" else [])
    assert tracking.history(ctx.store) == []
    dropped = sum(1 for *_, status in proxy.seen if status == 0)
    pending = _pending_logged_models(server.url, ctx)

    proxy.down, proxy.down_after = False, None  # the server is back; Airflow retries the task
    result = register(ctx)
    after = _state(server.url, name)
    assert after["versions"] == ["1"] and all(after["complete"]), after
    assert after["aliases"] == {"challenger": "1"}
    assert result["version"] == "1" and result["created"] is (outage != "after-version-created")
    assert [e["to_version"] for e in tracking.history(ctx.store)] == ["1"]
    if outage == "mid-upload":
        assert pending, "the outage did not interrupt the model upload"
    observe(f"outage {outage}: stage failed ({type(err.value).__name__}), {dropped} request(s) unanswered, "
            f"{len(pending)} half-logged model(s) left unregistered, "
            f"versions after failure {failed['versions'] or 'none'}, aliases {failed['aliases'] or 'none'}; "
            f"retry: versions {after['versions']}, aliases {after['aliases']}, created={result['created']}")


@pytest.mark.scenario(4, expected="the MLflow server process is killed during the stage and restarted: the retry "
                                   "registers exactly one version and moves the alias once")
def test_server_killed_and_restarted(server, model, tmp_path, fast_failing_client, observe):
    name = f"asr-{uuid.uuid4().hex[:8]}"
    ctx = _run(tmp_path, server.url, name, model)
    server.stop(signal.SIGKILL)
    try:
        with pytest.raises(Exception) as err:  # noqa: B017
            register(ctx)
        assert not isinstance(err.value, AssertionError)
        assert not ctx.is_complete("register") and tracking.history(ctx.store) == []
    finally:
        server.start()
        server.wait_ready()
    result = register(ctx)
    state = _state(server.url, name)
    assert state["versions"] == ["1"] and all(state["complete"]) and state["aliases"] == {"challenger": "1"}
    assert result["created"] is True
    observe(f"server SIGKILLed: stage failed with {type(err.value).__name__}: {str(err.value)[:120]}; after restart "
            f"the retry registered version {result['version']}, aliases {state['aliases']}")
