"""Stage ``register``: one registered model version per pipeline run, behind alias ``challenger``.

The gated candidate (``runs/{run_id}/gate/decision.json`` names it) is logged as an MLflow
pyfunc model with a signature (:mod:`pipeline.serving.pyfunc_model` is its code) on the
run's training run, and registered once, tagged with the run id, the lineage, its sha256
and the gate's verdict: a retried stage finds that version instead of creating a second
one. On a passed gate the alias ``challenger`` moves to it. The MLflow plumbing is
:mod:`pipeline.tracking`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.asr.evaluation import fetch_model, model_meta
from pipeline.storage import sha256_file
from pipeline.tracking import (
    CHALLENGER,
    MODEL_FILE,
    TAG_SHA256,
    RegistryError,
    client,
    ensure_registered_model,
    find_version_for_run,
    lineage_tags,
    log_pyfunc_model,
    mlflow_context,
    move_alias,
    training_run,
)

if TYPE_CHECKING:
    from pipeline.run import RunContext

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serving" / "pyfunc_model.py"


class GateNotPassed(RegistryError):
    """``register`` was asked to register a candidate whose gate failed."""


def register(ctx: RunContext, *, actor: str | None = None) -> dict[str, Any]:
    """Stage ``register``: one registered version for this run's gated candidate; alias ``challenger``.

    Raises :class:`GateNotPassed` when the gate failed (nothing is registered). A retry finds
    the version already created for this run (tag ``asr_run_id``) instead of adding one.
    """

    def body() -> dict[str, Any]:
        # MLflow's SQL registry resolves a version's models:/m-... source through the global
        # tracking URI, so the whole stage runs with it pointed at our tracking store.
        with mlflow_context(ctx.config.mlflow):
            return _register(ctx, actor)

    return ctx.run_stage("register", body)


def _register(ctx: RunContext, actor: str | None) -> dict[str, Any]:
    decision = _passed_decision(ctx)
    cfg = ctx.config.mlflow
    mlflow_run = training_run(ctx, read_meta=model_meta)
    created = False
    mv = find_version_for_run(cfg, ctx.run_id)
    if mv is None:
        mv = _create_version(ctx, decision, mlflow_run)
        created = True
    moved = move_alias(ctx, CHALLENGER, str(mv.version), action="register",
                       reason=_register_reason(decision), actor_name=actor)
    return {
        "registered": True,
        "created": created,
        "model": cfg.registered_model,
        "version": str(mv.version),
        "model_uri": f"models:/{cfg.registered_model}/{mv.version}",
        "alias": CHALLENGER,
        "alias_moved": moved is not None,
        "mlflow_run_id": mlflow_run,
        "forced": bool(decision.get("forced")),
    }


def _passed_decision(ctx: RunContext) -> dict[str, Any]:
    """The run's gate decision; raises unless it passed."""
    key = ctx.stage_key("gate", "decision.json")
    if not ctx.store.exists(key):
        raise RegistryError(f"no gate decision at {ctx.store.uri(key)}: run 'asr-retune gate --run-id {ctx.run_id}' first")
    decision = json.loads(ctx.store.get_text(key))
    if not decision.get("passed"):
        failing = ", ".join(decision.get("failing_rules") or []) or "?"
        raise GateNotPassed(
            f"the gate of run {ctx.run_id} failed ({failing}): nothing registered. "
            f"See {ctx.store.uri(ctx.stage_key('gate', 'report.html'))}; to override, re-run the gate "
            "with --force-reason."
        )
    return decision


def _create_version(ctx: RunContext, decision: dict[str, Any], mlflow_run: str) -> Any:
    """Log the gated model file (unchanged since the gate: same sha256) and register it."""
    cfg = ctx.config.mlflow
    model_key = decision["candidate"]["key"]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / MODEL_FILE
        fetch_model(ctx.store, model_key, local)
        sha = sha256_file(local)
        if decision["candidate"].get("sha256") not in (None, sha):
            raise RegistryError(f"{model_key} changed since the gate evaluated it (sha256 differs): re-run the gate")
        run_tags = {**lineage_tags(ctx, model_meta(local)), TAG_SHA256: sha}
        model_uri, model_id = log_pyfunc_model(cfg, mlflow_run, local, run_tags, python_model=PYFUNC_CODE)
        c = client(cfg)
        ensure_registered_model(c, cfg.registered_model)
        return c.create_model_version(
            cfg.registered_model, source=model_uri, run_id=mlflow_run, tags={**run_tags, **_gate_tags(decision)},
            model_id=model_id, description=f"asr-retune run {ctx.run_id}",
        )


def _gate_tags(decision: dict[str, Any]) -> dict[str, str]:
    tags = {
        "gate.passed": str(bool(decision.get("passed"))).lower(),
        "gate.forced": str(bool(decision.get("forced"))).lower(),
        "gate.cold_start": str(bool(decision.get("cold_start"))).lower(),
        "gate.mode": str(decision.get("mode")),
        "gate.candidate_wer": f"{(decision.get('candidate') or {}).get('wer')}",
        "gate.decision_uri": str(decision.get("decision_uri", "")),
        "gate.report_uri": str(decision.get("report_uri", "")),
    }
    if decision.get("production"):
        tags["gate.production_version"] = str(decision["production"].get("version"))
    if decision.get("forced"):
        tags["gate.force_reason"] = str(decision.get("force_reason"))[:5000]
        tags["gate.forced_by"] = str(decision.get("forced_by"))
    return tags


def _register_reason(decision: dict[str, Any]) -> str:
    if decision.get("forced"):
        return f"gate FORCED by {decision.get('forced_by')}: {decision.get('force_reason')}"
    return "gate passed" + (" (cold start: absolute rules only)" if decision.get("cold_start") else "")
