"""Reliability scenario 8: a candidate that is worse, produces NaN, or lacks a whole group is
never promoted without an explicit, recorded force.

Real gate and registry stages against a real ``mlflow server``, on a small demo golden set
of real FSDD recordings, with tiny hand-set models (tests/model_factory.py): production is
``mute`` (WER 100 %), the worse candidate ``babble`` (~260 %), the damaged one ``nan``
(every output NaN, yet its greedy transcripts score exactly like mute's).
"""

from __future__ import annotations

import shutil
import uuid

import pytest
from support.mlflow_server import MlflowServer
from support.model_factory import export_tiny
from support.registry_env import build_golden_store, put_candidate, registry_config

from pipeline import tracking
from pipeline.asr.evaluation import evaluate_model
from pipeline.asr.export import load_exported
from pipeline.config import GateConfig
from pipeline.run import RunContext
from pipeline.stages.gate import gate, read_decision
from pipeline.stages.gate.rules import decide
from pipeline.stages.gate.stage import read_cohorts
from pipeline.stages.register import GateNotPassed, register

pytestmark = pytest.mark.integration

# permissive absolute rules (a cold start would pass a 100 % WER model): only the safety rules can stop them
GATE = GateConfig(max_wer=5.0, max_rtf=2.0, min_group_utts=5, group_tolerance=0.03, bootstrap_resamples=500,
                  mode="non-regression", tolerance=0.01)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-gate")).start()
    golden = build_golden_store(tmp_path_factory.mktemp("golden"))
    d = tmp_path_factory.mktemp("models")
    models = {kind: export_tiny(d / f"{kind}.pt", kind) for kind in ("mute", "babble", "nan")}
    url = server.wait_ready()
    yield {"url": url, "golden": golden, "models": models}
    server.stop()


@pytest.fixture
def env(world, tmp_path, monkeypatch):
    root = tmp_path / "store"
    shutil.copytree(world["golden"], root)
    monkeypatch.setenv("ASR_RETUNE_ACTOR", "pytest")
    name = f"asr-{uuid.uuid4().hex[:8]}"
    config = registry_config(world["url"], tmp_path / "cache", name=name, experiment="asr-retune-gate-safety")
    return {"config": config, "root": str(root), "models": world["models"]}


def _ctx(env, run_id: str) -> RunContext:
    return RunContext.create(env["config"], run_id=run_id, root=env["root"])


def _registry_state(env) -> dict:
    cfg = env["config"].mlflow
    c = tracking.client(cfg)
    versions = sorted(v.version for v in c.search_model_versions(f"name = '{cfg.registered_model}'"))
    return {"aliases": tracking.aliases(cfg), "versions": versions}


def _with_production(env) -> None:
    """Week 1: mute gated (cold start), registered and promoted."""
    ctx = _ctx(env, "week-01")
    put_candidate(ctx, env["models"]["mute"])
    assert gate(ctx, settings=GATE)["passed"] is True
    register(ctx)
    tracking.promote(ctx, "1", reason="cold start")
    assert tracking.aliases(env["config"].mlflow) == {"challenger": "1", "production": "1"}


def _worse_candidate_after_production(env, run_id: str) -> RunContext:
    """Production in place (mute), then a run whose candidate is the worse model (babble)."""
    _with_production(env)
    ctx = _ctx(env, run_id)
    put_candidate(ctx, env["models"]["babble"])
    return ctx


def _refused(env, ctx: RunContext) -> dict:
    """The gate's decision; and register refuses it, changing nothing in the tracking."""
    before = _registry_state(env)
    history = tracking.history(ctx.store)
    with pytest.raises(GateNotPassed, match="nothing registered"):
        register(ctx)
    assert _registry_state(env) == before and tracking.history(ctx.store) == history
    assert not ctx.is_complete("register")
    return read_decision(ctx)


@pytest.mark.scenario(8, expected="a worse candidate fails the gate; register refuses it; production alias and "
                                   "versions unchanged; an empty force reason is refused")
def test_worse_candidate_is_never_registered(env, observe):
    ctx = _worse_candidate_after_production(env, "week-02")
    summary = gate(ctx, settings=GATE)
    assert summary["passed"] is False and summary["forced"] is False
    decision = _refused(env, ctx)
    assert {"delta_wer", "worst_group"} <= set(decision["failing_rules"])
    with pytest.raises(ValueError, match="non-empty reason"):
        gate(ctx, settings=GATE, force_reason="   ")
    assert read_decision(ctx)["forced"] is False and _registry_state(env)["aliases"]["production"] == "1"
    observe(f"gate failed on {decision['failing_rules']}; register raised GateNotPassed; "
            f"registry {_registry_state(env)}; blank force reason refused")


@pytest.mark.scenario(8, expected="a candidate whose outputs are NaN fails the gate even on a cold start where its "
                                   "WER passes the ceiling; register refuses it")
def test_nan_candidate_is_never_registered(env, observe):
    ctx = _ctx(env, "week-nan")  # cold start: only absolute rules, the permissive WER ceiling passes it
    put_candidate(ctx, env["models"]["nan"])
    summary = gate(ctx, settings=GATE)
    decision = _refused(env, ctx)
    assert summary["passed"] is False and decision["failing_rules"] == ["finite_outputs"]
    wer_rule = next(r for r in decision["rules"] if r["name"] == "wer_ceiling")
    assert wer_rule["passed"] is True  # the transcripts alone would have let it through
    assert _registry_state(env) == {"aliases": {}, "versions": []}
    finite = next(r for r in decision["rules"] if r["name"] == "finite_outputs")
    observe(f"cold start, WER {decision['candidate']['wer']:.2f} under the ceiling; {finite['detail']}; "
            "register refused, registry empty")


@pytest.mark.scenario(8, expected="a candidate scored without a whole group (speaker/cohort) production has fails "
                                   "coverage and worst_group")
def test_candidate_lacking_a_group_fails(env, observe):
    store = _ctx(env, "lacks").store
    manifest = "golden/v1/manifest.jsonl"
    prod = evaluate_model(load_exported(env["models"]["mute"]), store, manifest).utts
    cohorts = read_cohorts(store.get_text(manifest))
    unseen = {u.speaker for u in prod if cohorts.get(u.utt_id) == "unseen"}
    assert unseen, "the golden set has no unseen speaker"
    cand = [u for u in prod if u.speaker not in unseen]  # identical outputs, one whole group missing
    out = decide(cand, prod, candidate_rtf=0.1, cfg=GATE, cohorts=cohorts)
    assert out.decision["passed"] is False
    assert {"coverage", "worst_group"} <= set(out.decision["failing_rules"])
    missing = next(r for r in out.decision["rules"] if r["name"] == "coverage")
    observe(f"candidate lacks speaker(s) {sorted(unseen)} ({len(prod) - len(cand)} utts) with otherwise identical "
            f"outputs: failing {out.decision['failing_rules']}; {missing['detail']}")


@pytest.mark.scenario(8, expected="only an explicit force with a reason lets a failed candidate through, and the "
                                   "force is recorded in the decision, the report and the registered version")
def test_force_is_explicit_and_recorded(env, observe):
    ctx = _worse_candidate_after_production(env, "week-03")
    assert gate(ctx, settings=GATE)["passed"] is False
    reason = "INC-1234: production misbehaves on new hardware; ship the retrained model, re-gate next week"
    forced = gate(ctx, settings=GATE, force_reason=reason, actor="oncall@example.com")
    decision = read_decision(ctx)
    assert forced["passed"] is True and decision["forced"] is True and decision["rules_passed"] is False
    assert decision["force_reason"] == reason and decision["forced_by"] == "oncall@example.com"
    assert "GATE FORCED" in ctx.store.get_text(ctx.stage_key("gate", "report.html"))
    reg = register(ctx)
    assert reg["forced"] is True
    mv = tracking.client(env["config"].mlflow).get_model_version(env["config"].mlflow.registered_model, reg["version"])
    assert mv.tags["gate.forced"] == "true" and mv.tags["gate.force_reason"] == reason
    assert mv.tags["gate.forced_by"] == "oncall@example.com"
    # registered as challenger only: production moves by a separate, audited promotion
    assert tracking.aliases(env["config"].mlflow)["production"] == "1"
    observe(f"forced by {decision['forced_by']} (failing {decision['failing_rules']}): version {reg['version']} "
            "tagged gate.forced=true with the reason; report headline GATE FORCED; production alias still 1")
