"""Gate, registry, promotion and rollback against a real ``mlflow server`` on 127.0.0.1.

Models are tiny exports with hand-set weights (tests/model_factory.py): ``mute`` (WER
exactly 100 %) is the better model, ``babble`` (~260 %) the damaged one. The golden set is
a small demo golden set built from real FSDD recordings (5 speakers, one never seen).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from support.mlflow_server import free_port
from support.model_factory import export_tiny
from support.registry_env import build_golden_store, put_candidate, registry_config

from pipeline import tracking
from pipeline.asr.export import load_exported
from pipeline.config import Config, GateConfig
from pipeline.run import RunContext
from pipeline.stages.gate import gate, read_decision
from pipeline.stages.register import GateNotPassed, register
from pipeline.storage import sha256_file
from pipeline.tracking import RegistryError

pytestmark = pytest.mark.integration

GATE = GateConfig(max_wer=5.0, max_rtf=2.0, min_group_utts=5, group_tolerance=0.03, bootstrap_resamples=500)


@pytest.fixture(scope="module")
def mlflow_url(mlflow_started, golden_root, models) -> str:
    return mlflow_started.wait_ready()


@pytest.fixture(scope="module")
def golden_root(tmp_path_factory) -> Path:
    return build_golden_store(tmp_path_factory.mktemp("golden-store"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {kind: export_tiny(d / f"{kind}.pt", kind) for kind in ("mute", "babble")}


@pytest.fixture
def env(tmp_path, mlflow_started, golden_root, models, mlflow_url, monkeypatch):
    """A fresh store holding the golden set, and a registered-model name of its own."""
    root = tmp_path / "store"
    shutil.copytree(golden_root, root)
    monkeypatch.setenv("ASR_RETUNE_ACTOR", "pytest")
    name = f"asr-{uuid.uuid4().hex[:8]}"
    config = registry_config(mlflow_url, tmp_path / "model-cache", name=name)
    return {"config": config, "root": str(root), "name": name}


def run_ctx(env, run_id: str) -> RunContext:
    return RunContext.create(env["config"], run_id=run_id, root=env["root"])


def versions(env) -> list[str]:
    c = tracking.client(env["config"].mlflow)
    return sorted(v.version for v in c.search_model_versions(f"name = '{env['name']}'"))


def test_gate_register_promote_rollback(env, models):
    """Three weekly runs of one registered model (cold start, a better model, a damaged one forced), then a rollback."""
    _week1_cold_start(env, models)
    _week2_better_candidate(env, models)
    r3 = _week3_damaged_candidate_forced(env, models)
    _rollback_and_audit(env, r3)
    # models:/ URIs resolve through the registry to the exported TorchScript file
    cfg, name = env["config"].mlflow, env["name"]
    assert load_exported(tracking.resolve_model_uri(f"models:/{name}@production", cfg)).meta["kind"] == "babble"
    assert load_exported(tracking.resolve_model_uri(f"models:/{name}/2", cfg)).meta["kind"] == "mute"
    listing = tracking.registry_history(r3)
    assert listing["aliases"]["production"] == "1" and len(listing["moves"]) == 6


def _week1_cold_start(env, models) -> None:
    """Cold start (absolute rules only), the training run in MLflow, register (retried), promote."""
    cfg, name = env["config"].mlflow, env["name"]
    c = tracking.client(cfg)
    r1 = run_ctx(env, "week-01")
    put_candidate(r1, models["babble"])
    s = gate(r1, settings=GATE)
    assert s["passed"] is True and s["cold_start"] is True and s["production_version"] is None
    d = read_decision(r1)
    assert {r["name"] for r in d["rules"]} == {"finite_outputs", "wer_ceiling", "rtf_budget"}
    assert d["golden"]["version"] == "v1" and d["golden"]["cohorts"] == ["seen", "unseen"]
    html = r1.store.get_text(r1.stage_key("gate", "report.html"))
    assert "Cold start" in html and "GATE PASSED" in html
    assert "Cold start" in r1.store.get_text(r1.stage_key("gate", "report.md"))
    _check_training_run(c, s["mlflow_run_id"], d)

    # register: one version, alias challenger; a retried stage does not add a second version
    reg = register(r1)
    assert reg["version"] == "1" and reg["created"] is True
    assert tracking.aliases(cfg) == {"challenger": "1"}
    r1.store.delete(r1.stage_key("register", "_SUCCESS"))  # as if the task died before marking completion
    again = register(r1)
    assert again["version"] == "1" and again["created"] is False and again["skipped"] is False
    assert register(r1)["skipped"] is True
    assert versions(env) == ["1"]
    mv = c.get_model_version(name, "1")
    assert mv.tags["asr_run_id"] == "week-01" and mv.tags["gate.cold_start"] == "true"
    assert mv.tags["asr_sha256"] == sha256_file(models["babble"])
    _check_pyfunc(cfg, f"models:/{name}/1")

    p1 = tracking.promote(r1, "1", reason="first model: cold start, absolute rules passed")
    assert p1["changed"] and p1["from_version"] is None and tracking.aliases(cfg)["production"] == "1"
    assert tracking.promote(r1, "1", reason="retried task")["changed"] is False  # idempotent


def _check_training_run(c, mlflow_run_id: str, decision: dict) -> None:
    """The training run in MLflow: lineage, params, metrics, the report as artifacts."""
    run = c.get_run(mlflow_run_id)
    tags = run.data.tags
    assert tags["asr_run_id"] == "week-01"
    assert tags["asr_pool_version"] == "pool-0007"
    assert tags["asr_golden_version"] == "v1"
    assert len(tags["asr_config_hash"]) == 16 and tags["asr_code_version"]
    assert run.data.params["model.encoder"] == "transformer"  # from the model's own metadata
    assert "train.lr" in run.data.params
    assert run.data.metrics["golden.candidate_wer"] == pytest.approx(decision["candidate"]["wer"])
    assert [m.step for m in c.get_metric_history(run.info.run_id, "epoch.dev_wer")] == [1, 2, 3, 4, 5]
    assert {a.path for a in c.list_artifacts(run.info.run_id, "gate")} >= {
        "gate/decision.json", "gate/report.html", "gate/report.md"}


def _check_pyfunc(cfg, model_uri: str) -> None:
    """The registered version is an MLflow model with a signature, callable through pyfunc."""
    import mlflow
    import numpy as np
    import pandas as pd

    with tracking.mlflow_context(cfg):
        info = mlflow.models.get_model_info(model_uri)
        assert [i["name"] for i in info.signature.inputs.to_dict()] == ["wave"]
        pyfunc = mlflow.pyfunc.load_model(model_uri)
    out = pyfunc.predict(pd.DataFrame({"wave": [np.zeros(8000).tolist(), np.zeros(4000).tolist()]}))
    assert list(out.columns) == ["text"] and len(out) == 2 and set(out["text"][0]) <= {"e", " "}


def _week2_better_candidate(env, models) -> None:
    """A better candidate passes against production v1, is registered and promoted."""
    r2 = run_ctx(env, "week-02")
    put_candidate(r2, models["mute"])
    s2 = gate(r2, settings=GATE)
    d2 = read_decision(r2)
    assert s2["passed"] is True, d2["failing_rules"]
    assert s2["cold_start"] is False and s2["production_version"] == "1"
    delta = next(r for r in d2["rules"] if r["name"] == "delta_wer")
    assert delta["ci_high"] < 0 and d2["candidate"]["wer"] == pytest.approx(1.0)
    assert {g["key"] for g in d2["groups"]} >= {"cohort:seen", "cohort:unseen", "speaker:george"}
    assert register(r2)["version"] == "2"
    tracking.promote(r2, 2, reason="canary healthy at 100%", actor="canary-controller")


def _week3_damaged_candidate_forced(env, models) -> RunContext:
    """A damaged candidate fails against production v2 and is not registered, until forced with a reason."""
    cfg, name = env["config"].mlflow, env["name"]
    r3 = run_ctx(env, "week-03")
    put_candidate(r3, models["babble"])
    s3 = gate(r3, settings=GATE)
    assert s3["passed"] is False and "delta_wer" in s3["failing_rules"] and "worst_group" in s3["failing_rules"]
    html = r3.store.get_text(r3.stage_key("gate", "report.html"))
    assert "GATE FAILED" in html and "delta_wer" in html
    with pytest.raises(GateNotPassed, match="nothing registered"):
        register(r3)
    assert versions(env) == ["1", "2"]
    assert tracking.aliases(cfg) == {"challenger": "2", "production": "2"}

    # a manual force needs a reason; it is recorded in the decision, the report and the registry
    with pytest.raises(ValueError, match="non-empty reason"):
        gate(r3, settings=GATE, force_reason=" ")
    s3f = gate(r3, settings=GATE, force_reason="ship the accent fix now, incident INC-42", actor="alice")
    assert s3f["passed"] is True and s3f["forced"] is True and s3f["rules_passed"] is False
    d3 = read_decision(r3)
    assert d3["force_reason"] == "ship the accent fix now, incident INC-42" and d3["forced_by"] == "alice"
    assert "INC-42" in r3.store.get_text(r3.stage_key("gate", "report.html"))
    reg3 = register(r3)
    assert reg3["forced"] is True
    mv3 = tracking.client(cfg).get_model_version(name, reg3["version"])
    assert mv3.tags["gate.forced"] == "true" and "INC-42" in mv3.tags["gate.force_reason"]
    assert tracking.aliases(cfg)["production"] == "2"  # registering never moves production
    return r3


def _rollback_and_audit(env, r3: RunContext) -> None:
    """Rollback goes back to the version before v2; every move is in the history and in MLflow."""
    cfg, name = env["config"].mlflow, env["name"]
    with pytest.raises(ValueError, match="non-empty reason"):
        tracking.rollback(r3, reason="")
    rb = tracking.rollback(r3, reason="WER alarms after the week-02 rollout")
    assert (rb["from_version"], rb["to_version"]) == ("2", "1")
    assert tracking.aliases(cfg)["production"] == "1"
    with pytest.raises(RegistryError, match="first production version"):
        tracking.rollback(r3, reason="again")

    moves = [m for m in tracking.history(r3.store) if m["alias"] == "production"]
    assert [(m["action"], m["from_version"], m["to_version"]) for m in moves] == [
        ("promote", None, "1"), ("promote", "1", "2"), ("rollback", "2", "1")]
    assert moves[1]["reason"] == "canary healthy at 100%" and moves[1]["actor"] == "canary-controller"
    assert moves[2]["reason"] == "WER alarms after the week-02 rollout" and moves[2]["actor"] == "pytest"
    assert all(m["at"] and m["model"] == name for m in moves)
    challenger = [m["to_version"] for m in tracking.history(r3.store) if m["alias"] == "challenger"]
    assert challenger == ["1", "2", "3"]

    # the same moves are in MLflow
    c = tracking.client(cfg)
    model = c.get_registered_model(name)
    audit = [json.loads(v) for k, v in sorted(model.tags.items()) if k.startswith("audit.")]
    assert len(audit) == len(tracking.history(r3.store))
    assert audit[-1]["action"] == "rollback" and audit[-1]["reason"] == "WER alarms after the week-02 rollout"
    v1 = json.loads(c.get_model_version(name, "1").tags["production.last_set"])
    assert v1["reason"] == "WER alarms after the week-02 rollout" and v1["from_version"] == "2"
    assert v1["action"] == "rollback" and v1["actor"] == "pytest" and v1["at"]
    v2 = json.loads(c.get_model_version(name, "2").tags["production.last_unset"])
    assert v2["reason"] == "WER alarms after the week-02 rollout" and v2["to_version"] == "1"


def test_register_needs_a_gate_decision(env):
    ctx = run_ctx(env, "no-gate")
    with pytest.raises(RegistryError, match="no gate decision"):
        register(ctx)


def test_promote_checks_reason_and_version(env, models):
    ctx = run_ctx(env, "promote-checks")
    with pytest.raises(ValueError, match="non-empty reason"):
        tracking.promote(ctx, "1", reason="  ")
    with pytest.raises(Exception):  # noqa: B017 - the registered model does not exist yet
        tracking.promote(ctx, "1", reason="x")
    assert tracking.history(ctx.store) == []


def write_passed_decision(ctx: RunContext, model: Path) -> None:
    """A minimal passed gate decision (what register reads), without evaluating anything."""
    put_candidate(ctx, model)
    key = ctx.stage_key("train", "model.pt")
    ctx.store.put_text(ctx.stage_key("gate", "decision.json"), json.dumps({
        "passed": True, "forced": False, "cold_start": True, "mode": "improve", "failing_rules": [], "rules": [],
        "candidate": {"key": key, "sha256": sha256_file(model), "wer": 0.1},
        "golden": {"version": "v1"}, "production": None,
    }))


def test_alias_moved_outside_asr_retune_blocks_rollback(env, models):
    ctx = run_ctx(env, "outside")
    write_passed_decision(ctx, models["babble"])
    register(ctx)
    tracking.promote(ctx, "1", reason="first")
    tracking.client(env["config"].mlflow).delete_registered_model_alias(env["name"], "production")
    with pytest.raises(RegistryError, match="no production version"):
        tracking.rollback(ctx, reason="x")


def test_gate_needs_a_candidate(env):
    ctx = run_ctx(env, "no-candidate")
    with pytest.raises(FileNotFoundError, match="run the train stage"):
        gate(ctx, settings=GATE)


def test_unreachable_tracking_server_is_not_a_cold_start(env, models, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")

    offline = env["config"].mlflow.model_copy(update={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    config = env["config"].model_copy(update={"mlflow": offline})
    ctx = RunContext.create(config, run_id="offline", root=env["root"])
    put_candidate(ctx, models["mute"])
    with pytest.raises(Exception) as err:  # noqa: B017
        gate(ctx, settings=GATE)
    assert not isinstance(err.value, AssertionError)
    assert not ctx.is_complete("gate") and not ctx.store.exists(ctx.stage_key("gate", "decision.json"))


def test_embedded_default_sqlite_store(tmp_path, models, monkeypatch):
    """The embedded default: SQLite tracking/registry and local artifacts, paths relative to the cwd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASR_RETUNE_ACTOR", "pytest")
    config = Config()  # mlflow.tracking_uri sqlite:///.asr-retune/mlflow.db, artifact_root .asr-retune/mlartifacts
    ctx = RunContext.create(config, run_id="embedded", root=str(tmp_path / "store"))
    write_passed_decision(ctx, models["mute"])
    assert register(ctx)["version"] == "1"
    tracking.promote(ctx, "1", reason="first")
    assert tracking.aliases(config.mlflow) == {"challenger": "1", "production": "1"}
    with pytest.raises(RegistryError, match="first production version"):
        tracking.rollback(ctx, reason="nothing before it")
    path = tracking.resolve_model_uri("models:/asr@production", config.mlflow)
    assert path.is_relative_to(tmp_path / ".asr-retune") and load_exported(path).meta["kind"] == "mute"
    assert (tmp_path / ".asr-retune" / "mlflow.db").exists()
    assert any((tmp_path / ".asr-retune" / "mlartifacts").rglob("model.pt"))


def test_resolve_model_uri_rejects_other_uris():
    for bad in ("runs:/abc/model", "models:/asr", "models:/asr@", "/tmp/model.pt"):
        with pytest.raises(ValueError, match="not a registry URI"):
            tracking.resolve_model_uri(bad, Config().mlflow)
