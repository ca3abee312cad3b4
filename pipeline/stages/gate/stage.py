"""Stage ``gate``: the candidate against the production model on the golden set, in the same run.

It evaluates the candidate (``runs/{run_id}/train/model.pt``) and the model behind the
MLflow alias ``production`` on the same golden set, applies the rules of
:mod:`pipeline.stages.gate.rules` and writes ``runs/{run_id}/gate/decision.json``, the
per-utterance scores, the bootstrap samples and the on-call report (``report.html``,
``report.md``, :mod:`pipeline.stages.gate.report`), also logged to the training run in
MLflow. The golden manifest's ``seen`` flags and ``condition`` fields add the groups
``cohort:*`` and ``condition:*``; the report quotes the gate's calibrated pass rates for the
golden set (:mod:`pipeline.stages.gate.calibration`). A manual force (``force_reason``)
re-runs a finished gate and is recorded.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.asr.metrics import EvalResult, UttScore
from pipeline.config import GateConfig
from pipeline.stages.gate import report
from pipeline.stages.gate.calibration import calibration_path, manifest_sha256, read_calibration
from pipeline.stages.gate.rules import (
    Outcome,
    check_force_reason,
    decide,
    finite_or_none,
)
from pipeline.storage import ObjectStore, join, sha256_file
from pipeline.tracking import (
    TAG_GOLDEN,
    TAG_SHA256,
    RegisteredModel,
    log_gate,
    production_model,
)
from pipeline.tracking import actor as tracking_actor

STAGE = "gate"
DECISION = "decision.json"
OUTPUTS = (DECISION, "report.html", "report.md", "candidate_utts.jsonl", "production_utts.jsonl", "bootstrap.json")


@dataclass
class Evaluation:
    """Both models scored on the golden set (``production`` is ``None`` on a cold start)."""

    candidate: EvalResult
    candidate_sha256: str
    candidate_meta: dict[str, Any]
    production: RegisteredModel | None
    production_eval: EvalResult | None


def _records(manifest_text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in manifest_text.splitlines() if line.strip()]


def read_cohorts(manifest_text: str) -> dict[str, str]:
    """utt_id -> ``seen``/``unseen`` from the golden manifest's ``seen`` flags (absent: no cohort)."""
    return {rec["utt_id"]: "seen" if rec["seen"] else "unseen" for rec in _records(manifest_text)
            if isinstance(rec.get("seen"), bool) and "utt_id" in rec}


def read_conditions(manifest_text: str) -> dict[str, str]:
    """utt_id -> recording condition from the golden manifest's ``condition`` fields (absent: no condition
    group; golden v1 has none)."""
    return {rec["utt_id"]: rec["condition"].strip() for rec in _records(manifest_text)
            if isinstance(rec.get("condition"), str) and rec["condition"].strip() and "utt_id" in rec}


def utt_rows(utts: Sequence[UttScore]) -> str:
    return "".join(json.dumps(asdict(u), sort_keys=True) + "\n" for u in utts)


def gate(
    ctx: Any,
    *,
    candidate_key: str | None = None,
    force_reason: str | None = None,
    actor: str | None = None,
    settings: GateConfig | None = None,
) -> dict[str, Any]:
    """Stage ``gate``: evaluate candidate and production on the golden set, decide, report.

    ``candidate_key`` is a store key or a local file (default ``runs/{run_id}/train/model.pt``).
    ``force_reason`` forces a pass (re-running a finished gate); it must be non-empty.
    Returns ``passed`` (the DAG branches on it), ``cold_start``, ``forced``, ``failing_rules``
    and the URIs of the decision and the report. ``settings`` overrides ``config.gate``.
    """
    reason = check_force_reason(force_reason)
    cfg = settings or ctx.config.gate

    def body() -> dict[str, Any]:
        return _run_gate(ctx, cfg, candidate_key or ctx.stage_key("train", "model.pt"), reason, tracking_actor(actor))

    return ctx.run_stage(STAGE, body, force=reason is not None)


def _run_gate(ctx: Any, cfg: GateConfig, candidate_key: str, reason: str | None, actor: str) -> dict[str, Any]:
    version = cfg.golden_version or ctx.config.demo.golden_version
    manifest_key = _golden_manifest(ctx.store, version)
    manifest_text = ctx.store.get_text(manifest_key)
    cohorts, conditions = read_cohorts(manifest_text), read_conditions(manifest_text)
    local_candidate = _check_candidate(ctx, candidate_key)
    ev = _evaluate(ctx, cfg, candidate_key, manifest_key)
    outcome = decide(
        ev.candidate.utts, ev.production_eval.utts if ev.production_eval else None,
        candidate_rtf=ev.candidate.summary()["rtf"], cfg=cfg, cohorts=cohorts, conditions=conditions,
        force_reason=reason, forced_by=actor,
    )
    keys = {name: join(ctx.stage_prefix(STAGE), name) for name in OUTPUTS}
    sha = manifest_sha256(manifest_text)
    decision = _decision(ctx, cfg, outcome, ev, version=version, manifest_key=manifest_key, cohorts=cohorts,
                         candidate={"key": candidate_key,
                                    "uri": candidate_key if local_candidate else ctx.store.uri(candidate_key)},
                         keys=keys)
    decision["golden"] |= {"manifest_sha256": sha, "conditions": sorted(set(conditions.values()))}
    decision["calibration"] = read_calibration(calibration_path(cfg), version, sha, cfg)
    samples = _write_scores(ctx.store, keys, decision, outcome, ev)
    _write_report(ctx, cfg, keys, decision, ev, samples, _finite_list(outcome.utterance_bootstrap))
    mlflow_run = _log_to_mlflow(ctx, keys, decision, outcome, ev, version=version, reason=reason, actor=actor)
    return _summary(cfg, decision, ev, version, mlflow_run)


def _golden_manifest(store: ObjectStore, version: str) -> str:
    manifest_key = join("golden", version, "manifest.jsonl")
    if not store.exists(manifest_key):
        raise FileNotFoundError(
            f"golden set {version!r} not found at {store.uri(manifest_key)}: build it ('asr-retune demo-data') "
            "or set gate.golden_version"
        )
    return manifest_key


def _check_candidate(ctx: Any, candidate_key: str) -> bool:
    """Whether the candidate is a local file; a missing candidate raises."""
    local_candidate = os.path.isfile(candidate_key)
    if not local_candidate and not ctx.store.exists(candidate_key):
        raise FileNotFoundError(
            f"no candidate model at {ctx.store.uri(candidate_key)}: run the train stage for run {ctx.run_id} "
            "first, or pass --candidate KEY"
        )
    return local_candidate


def _evaluate(ctx: Any, cfg: GateConfig, candidate_key: str, manifest_key: str) -> Evaluation:
    """Score the candidate and (when there is one) production on the golden set."""
    from pipeline.asr.evaluation import evaluate_model, fetch_model
    from pipeline.asr.export import load_exported

    store = ctx.store
    production = production_model(ctx.config.mlflow)
    with tempfile.TemporaryDirectory() as tmp:
        cand_path = Path(tmp) / "candidate.pt"
        fetch_model(store, candidate_key, cand_path)
        cand_sha = sha256_file(cand_path)
        cand_model = load_exported(cand_path)
        cand_eval = evaluate_model(cand_model, store, manifest_key, batch_size=cfg.batch_size, progress="gate: candidate")
        prod_eval = None
        if production is not None:
            prod_eval = evaluate_model(load_exported(production.path), store, manifest_key, batch_size=cfg.batch_size,
                                       progress="gate: production")
    return Evaluation(cand_eval, cand_sha, cand_model.meta, production, prod_eval)


def _decision(
    ctx: Any, cfg: GateConfig, outcome: Outcome, ev: Evaluation, *, version: str, manifest_key: str,
    cohorts: dict[str, str], candidate: dict[str, str], keys: dict[str, str],
) -> dict[str, Any]:
    """What ``decision.json`` holds: the outcome plus both models, the golden set and the config."""
    store = ctx.store
    cand_summary = ev.candidate.summary()
    production = ev.production
    return {
        "run_id": ctx.run_id,
        "decided_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **outcome.decision,
        "candidate": {
            **candidate,
            "sha256": ev.candidate_sha256,
            **_brief(cand_summary),
            "model_meta": {k: v for k, v in ev.candidate_meta.items() if k not in ("tokens", "frontend")},
        },
        "production": None if production is None or ev.production_eval is None else {
            "model": production.name,
            "version": production.version,
            "model_uri": production.uri,
            "run_id": production.run_id,
            "sha256": production.tags.get(TAG_SHA256),
            **_brief(ev.production_eval.summary()),
        },
        "golden": {
            "version": version,
            "manifest_uri": store.uri(manifest_key),
            "meta": _golden_meta(store, version),
            "n_utts": cand_summary["n_utts"],
            "n_words": cand_summary["n_words"],
            "cohorts": sorted(set(cohorts.values())),
        },
        "config": cfg.model_dump(mode="json"),
        "decision_uri": store.uri(keys[DECISION]),
        "report_uri": store.uri(keys["report.html"]),
        "report_md_uri": store.uri(keys["report.md"]),
    }


def _golden_meta(store: ObjectStore, version: str) -> Any:
    """The golden set's meta.json, kept small: its composition only."""
    key = join("golden", version, "meta.json")
    meta = json.loads(store.get_text(key)) if store.exists(key) else None
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items()
                if not isinstance(v, (list, dict)) or k in ("held_out_speakers", "held_out_voices")}
    return meta


def _write_scores(store: ObjectStore, keys: dict[str, str], decision: dict[str, Any], outcome: Outcome,
                  ev: Evaluation) -> list[float]:
    """The decision, per-utterance scores and bootstrap samples; returns the (finite) blockwise samples."""
    store.put_text(keys[DECISION], json.dumps(decision, indent=2, sort_keys=True, allow_nan=False) + "\n")
    store.put_text(keys["candidate_utts.jsonl"], utt_rows(ev.candidate.utts))
    if ev.production_eval is not None:
        store.put_text(keys["production_utts.jsonl"], utt_rows(ev.production_eval.utts))
    samples = _finite_list(outcome.bootstrap)
    store.put_text(keys["bootstrap.json"], json.dumps(
        {"samples": samples, "method": "blockwise", "utterance_samples": _finite_list(outcome.utterance_bootstrap)}) + "\n")
    return samples


def _finite_list(boot: dict[str, Any] | None) -> list[float]:
    return [] if boot is None else [float(x) for x in boot["samples"] if math.isfinite(x)]


def _write_report(ctx: Any, cfg: GateConfig, keys: dict[str, str], decision: dict[str, Any], ev: Evaluation,
                  samples: list[float], utterance_samples: list[float]) -> None:
    notes: list[str] = []
    inputs = report.ReportInputs(
        decision=decision,
        candidate=ev.candidate.utts,
        production=ev.production_eval.utts if ev.production_eval else None,
        bootstrap_samples=samples,
        utterance_samples=utterance_samples,
        leaderboard=_optional_json(ctx.store, ctx.stage_key("search", "leaderboard.json"), notes),
        search_selection=(_optional_json(ctx.store, ctx.stage_key("search", "best_config.json"), notes) or {}).get("_selection"),
        history=_optional_json(ctx.store, ctx.stage_key("train", "history.json"), notes),
        notes=notes,
        top_utts=cfg.report_top_utts,
        leaderboard_rows=cfg.report_leaderboard_rows,
    )
    html, md = report.render_html(inputs), report.render_markdown(inputs)
    ctx.store.put_text(keys["report.html"], html)
    ctx.store.put_text(keys["report.md"], md)


def _log_to_mlflow(ctx: Any, keys: dict[str, str], decision: dict[str, Any], outcome: Outcome, ev: Evaluation, *,
                   version: str, reason: str | None, actor: str) -> str:
    """Metrics, tags, and the decision and reports as artifacts of the run's training run."""
    cand_summary = ev.candidate.summary()
    metrics = {"gate.passed": float(decision["passed"]), "golden.candidate_wer": cand_summary["wer"],
               "golden.candidate_cer": cand_summary["cer"], "golden.candidate_rtf": cand_summary["rtf"]}
    if ev.production_eval is not None:
        metrics["golden.production_wer"] = ev.production_eval.summary()["wer"]
    if decision["bootstrap"]:
        for k in ("delta", "ci_low", "ci_high"):
            metrics[f"golden.delta_wer.{k}"] = decision["bootstrap"][k]
        for k in ("ci_low", "ci_high"):
            metrics[f"golden.delta_wer.utterance_{k}"] = decision["bootstrap_utterance"][k]
    for g in outcome.groups:
        metrics[f"golden.group_wer.{g.key}"] = g.candidate_wer
    tags = {"gate.passed": str(decision["passed"]).lower(), "gate.cold_start": str(outcome.decision["cold_start"]).lower(),
            "gate.forced": str(decision["forced"]).lower(), TAG_GOLDEN: version}
    if reason:
        tags["gate.force_reason"] = reason
        tags["gate.forced_by"] = actor
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in (DECISION, "report.html", "report.md"):
            files[name] = Path(tmp) / name
            files[name].write_text(ctx.store.get_text(keys[name]), encoding="utf-8")
        from pipeline.asr.evaluation import model_meta

        return log_gate(ctx, files, metrics, tags, read_meta=model_meta)


def _summary(cfg: GateConfig, decision: dict[str, Any], ev: Evaluation, version: str, mlflow_run: str) -> dict[str, Any]:
    """The stage's summary (``_SUCCESS``): what the DAG branches on and where the report is."""
    prod_summary = ev.production_eval.summary() if ev.production_eval else None
    boot = decision.get("bootstrap") or {}
    cohorts = {g["key"].split(":", 1)[1]: {"candidate_wer": finite_or_none(g.get("candidate_wer")),
                                           "production_wer": finite_or_none(g.get("production_wer"))}
               for g in decision.get("groups") or [] if g.get("kind") == "cohort"}
    return {
        "passed": decision["passed"],
        "rules_passed": decision["rules_passed"],
        "failing_rules": decision["failing_rules"],
        "cold_start": decision["cold_start"],
        "forced": decision["forced"],
        "mode": cfg.mode,
        "candidate_wer": finite_or_none(ev.candidate.summary()["wer"]),
        "production_wer": finite_or_none(prod_summary["wer"]) if prod_summary else None,
        "production_version": ev.production.version if ev.production else None,
        "delta_wer": finite_or_none(boot.get("delta")),
        "delta_ci": [finite_or_none(boot.get("ci_low")), finite_or_none(boot.get("ci_high"))] if boot else None,
        "confidence": boot.get("confidence"),
        "cohorts": cohorts,
        "golden_version": version,
        "decision_uri": decision["decision_uri"],
        "report_uri": decision["report_uri"],
        "report_md_uri": decision["report_md_uri"],
        "mlflow_run_id": mlflow_run,
    }


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: finite_or_none(summary[k]) for k in ("wer", "cer", "rtf", "n_utts", "n_words")}


def _optional_json(store: ObjectStore, key: str, notes: list[str]) -> Any:
    """An optional input of the report; an unreadable one is named in the report, not hidden."""
    if not store.exists(key):
        return None
    try:
        return json.loads(store.get_text(key))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        notes.append(f"{store.uri(key)} is not valid JSON ({exc}); its section is left out")
        return None


def read_decision(ctx: Any) -> dict[str, Any]:
    """The gate decision of ``ctx``'s run (for the DAG's branch and the CLI)."""
    key = ctx.stage_key(STAGE, DECISION)
    if not ctx.store.exists(key):
        raise FileNotFoundError(f"no gate decision at {ctx.store.uri(key)}: run the gate stage first")
    return json.loads(ctx.store.get_text(key))
