"""Gating: the candidate against the production model on the golden set, in the same run.

Stage ``gate`` evaluates the candidate (``runs/{run_id}/train/model.pt``) and the model
behind the MLflow alias ``production`` on the same golden set, applies the rules below and
writes ``runs/{run_id}/gate/decision.json`` plus the on-call report (``report.html``,
``report.md``), also logged to the training run in MLflow.

Rules (thresholds from :class:`GateConfig`; every rule is a pure function of per-utterance
error counts, so it is tested without models):

* absolute: ``finite_outputs`` (the candidate's outputs held no NaN/Inf on any golden
  utterance: a damaged model fails even where its transcripts happen to score well),
  ``wer_ceiling`` (candidate WER <= ``max_wer``; NaN fails), ``rtf_budget``
  (real-time factor <= ``max_rtf``) and, if set, ``group_wer_ceiling`` (every group with
  >= ``min_group_utts`` utterances <= ``max_group_wer``);
* relative to production (skipped on a cold start, which the decision and report say):
  ``coverage`` (the candidate was scored on every utterance production was),
  ``delta_wer`` (paired bootstrap CI of candidate - production WER, resampling utterances;
  ``improve`` mode passes if the upper bound <= -``min_improvement``, ``non-regression``
  mode if it is <= +``tolerance``) and ``worst_group`` (for every speaker, accent group and
  seen/unseen cohort with >= ``min_group_utts`` utterances, the upper bound of that group's
  paired-bootstrap ΔWER <= ``group_tolerance``; a group production had that the candidate
  lacks, or a NaN group WER, fails).

A manual force (``force_reason``, never the default) passes a failed gate; it needs a
non-empty reason and is recorded in the decision, the report and the registry.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.config import GateConfig
from pipeline.asr.metrics import UttScore, paired_bootstrap

STAGE = "gate"
DECISION = "decision.json"


def gate_config(config: Any) -> GateConfig:
    """``config.gate`` when the main configuration has it, else the defaults."""
    found = getattr(config, "gate", None)
    if found is None:
        return GateConfig()
    return found if isinstance(found, GateConfig) else GateConfig.model_validate(found.model_dump())


# --------------------------------------------------------------------------- pure rules


@dataclass
class Rule:
    name: str
    kind: Literal["absolute", "relative"]
    value: float | None
    threshold: float
    passed: bool
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "value": _finite(self.value),
            "threshold": self.threshold,
            "comparison": "<=",
            "passed": self.passed,
            "detail": self.detail,
            **self.extra,
        }


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _le(value: float | None, threshold: float) -> bool:
    """value <= threshold, and NaN/None never passes."""
    return value is not None and math.isfinite(value) and value <= threshold + 1e-12


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


def _pp(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.2f} pts"


def wer_of(utts: Sequence[UttScore]) -> float:
    words = sum(u.ref_words for u in utts)
    return sum(u.errors for u in utts) / words if words else math.nan


def rule_wer_ceiling(wer: float, max_wer: float) -> Rule:
    ok = _le(wer, max_wer)
    detail = f"candidate WER {_pct(wer)} vs ceiling {_pct(max_wer)}"
    if wer is None or not math.isfinite(wer):
        detail = "candidate WER is NaN (no scored words): fails"
    return Rule("wer_ceiling", "absolute", wer, max_wer, ok, detail)


def rule_finite_outputs(candidate: Sequence[UttScore]) -> Rule:
    bad = [u.utt_id for u in candidate if not u.finite]
    detail = "outputs finite on every utterance" if not bad else (
        f"NaN/Inf outputs on {len(bad)} of {len(candidate)} utterances (first: {', '.join(bad[:3])}): a damaged model")
    return Rule("finite_outputs", "absolute", len(bad), 0, not bad, detail)


def rule_rtf(rtf: float, max_rtf: float) -> Rule:
    ok = _le(rtf, max_rtf)
    if rtf is None or not math.isfinite(rtf):
        return Rule("rtf_budget", "absolute", None, max_rtf, False, "real-time factor unknown (no audio): fails")
    return Rule("rtf_budget", "absolute", rtf, max_rtf, ok, f"real-time factor {rtf:.4f} vs budget {max_rtf}")


def group_keys(u: UttScore, cohorts: Mapping[str, str] | None = None) -> list[str]:
    """The groups an utterance belongs to: its speaker, its accent group, its seen/unseen cohort."""
    keys = [f"speaker:{u.speaker}", f"group:{u.group}"]
    if cohorts and u.utt_id in cohorts:
        keys.append(f"cohort:{cohorts[u.utt_id]}")
    return keys


def groups_of(utts: Sequence[UttScore], cohorts: Mapping[str, str] | None = None) -> dict[str, list[UttScore]]:
    out: dict[str, list[UttScore]] = defaultdict(list)
    for u in utts:
        for k in group_keys(u, cohorts):
            out[k].append(u)
    return dict(sorted(out.items()))


def rule_group_ceiling(candidate: Sequence[UttScore], cfg: GateConfig, cohorts: Mapping[str, str] | None) -> Rule:
    assert cfg.max_group_wer is not None
    worst_key, worst = None, -math.inf
    for key, utts in groups_of(candidate, cohorts).items():
        if len(utts) < cfg.min_group_utts:
            continue
        w = wer_of(utts)
        if not math.isfinite(w):
            worst_key, worst = key, math.nan
            break
        if w > worst:
            worst_key, worst = key, w
    if worst_key is None:
        return Rule("group_wer_ceiling", "absolute", None, cfg.max_group_wer, True,
                    f"no group has >= {cfg.min_group_utts} utterances")
    ok = _le(worst, cfg.max_group_wer)
    return Rule("group_wer_ceiling", "absolute", worst, cfg.max_group_wer, ok,
                f"worst group {worst_key}: WER {_pct(worst)} vs ceiling {_pct(cfg.max_group_wer)}",
                {"group": worst_key})


def _pair(candidate: Sequence[UttScore], production: Sequence[UttScore]) -> tuple[list[UttScore], list[UttScore], list[str]]:
    """Utterances scored by both (production's order), and production's utt_ids the candidate lacks."""
    by_id = {u.utt_id: u for u in candidate}
    cand, prod, missing = [], [], []
    for p in production:
        c = by_id.get(p.utt_id)
        if c is None:
            missing.append(p.utt_id)
        else:
            cand.append(c)
            prod.append(p)
    return cand, prod, missing


def bootstrap_delta(cand: Sequence[UttScore], prod: Sequence[UttScore], cfg: GateConfig, seed: int) -> dict[str, Any]:
    """Paired bootstrap of WER(candidate) - WER(production); NaN bounds when there are no words."""
    words = [p.ref_words for p in prod]
    if not cand or sum(words) == 0:
        return {"delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "confidence": cfg.confidence,
                "n_resamples": cfg.bootstrap_resamples, "samples": np.array([])}
    return paired_bootstrap(
        [c.errors for c in cand], [p.errors for p in prod], words,
        n_resamples=cfg.bootstrap_resamples, seed=seed, confidence=cfg.confidence,
    )


def rule_coverage(missing: Sequence[str]) -> Rule:
    n = len(missing)
    shown = ", ".join(list(missing)[:5]) + (" ..." if n > 5 else "")
    return Rule("coverage", "relative", float(n), 0.0, n == 0,
                "candidate scored on every utterance production was" if n == 0
                else f"candidate lacks {n} utterance(s) production was scored on: {shown}")


def rule_delta_wer(boot: Mapping[str, Any], cfg: GateConfig) -> Rule:
    upper = float(boot["ci_high"])
    conf = f"{100 * cfg.confidence:.0f}%"
    if cfg.mode == "improve":
        threshold = -cfg.min_improvement
        want = f"must be <= {_pp(threshold)} (improve mode: better by a margin the noise cannot explain)"
    else:
        threshold = cfg.tolerance
        want = f"must be <= {_pp(threshold)} (non-regression mode)"
    ok = _le(upper, threshold)
    detail = (f"ΔWER {_pp(boot['delta'])}, {conf} CI [{_pp(boot['ci_low'])}, {_pp(upper)}]; upper bound {want}")
    if not math.isfinite(upper):
        detail = "ΔWER is NaN (no paired words): fails"
    return Rule("delta_wer", "relative", upper, threshold, ok, detail,
                {"delta": _finite(float(boot["delta"])), "ci_low": _finite(float(boot["ci_low"])),
                 "ci_high": _finite(upper), "mode": cfg.mode})


@dataclass
class GroupComparison:
    key: str
    n_utts: int
    n_words: int
    candidate_wer: float
    production_wer: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    checked: bool
    passed: bool | None
    note: str = ""

    @property
    def kind(self) -> str:
        return self.key.split(":", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "kind": self.kind, "n_utts": self.n_utts, "n_words": self.n_words,
            "candidate_wer": _finite(self.candidate_wer), "production_wer": _finite(self.production_wer),
            "delta": _finite(self.delta), "ci_low": _finite(self.ci_low), "ci_high": _finite(self.ci_high),
            "checked": self.checked, "passed": self.passed, "note": self.note,
        }


def _group_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31)


def compare_groups(
    candidate: Sequence[UttScore],
    production: Sequence[UttScore] | None,
    cfg: GateConfig,
    cohorts: Mapping[str, str] | None = None,
) -> list[GroupComparison]:
    """Per group: both WERs, and for groups with enough utterances the paired-bootstrap ΔWER CI."""
    cand_groups = groups_of(candidate, cohorts)
    if production is None:
        return [
            GroupComparison(k, len(u), sum(x.ref_words for x in u), wer_of(u), None, None, None, None, False, None,
                            "cold start")
            for k, u in cand_groups.items()
        ]
    prod_groups = groups_of(production, cohorts)
    by_id = {u.utt_id: u for u in candidate}
    out = []
    for key in sorted(set(cand_groups) | set(prod_groups)):
        prod_u = prod_groups.get(key, [])
        cand_u = [by_id[p.utt_id] for p in prod_u if p.utt_id in by_id]
        n_words = sum(p.ref_words for p in prod_u)
        eligible = len(prod_u) >= cfg.min_group_utts
        if not prod_u:  # a group only the candidate has: shown, nothing to compare
            u = cand_groups[key]
            out.append(GroupComparison(key, len(u), sum(x.ref_words for x in u), wer_of(u), None, None, None, None,
                                       False, None, "not in production's evaluation"))
            continue
        cw, pw = wer_of(cand_u), wer_of(prod_u)
        if not eligible:
            out.append(GroupComparison(key, len(prod_u), n_words, cw, pw, cw - pw if cand_u else None, None, None,
                                       False, None, f"< {cfg.min_group_utts} utterances: not checked"))
            continue
        if len(cand_u) < len(prod_u) or not math.isfinite(cw) or not math.isfinite(pw):
            note = ("the candidate lacks this group's utterances" if len(cand_u) < len(prod_u)
                    else "NaN WER (no reference words)")
            out.append(GroupComparison(key, len(prod_u), n_words, cw, pw, None, None, None, True, False, note))
            continue
        paired_prod = [p for p in prod_u if p.utt_id in by_id]
        boot = bootstrap_delta(cand_u, paired_prod, cfg, _group_seed(cfg.seed, key))
        ok = _le(boot["ci_high"], cfg.group_tolerance)
        out.append(GroupComparison(key, len(prod_u), n_words, cw, pw, boot["delta"], boot["ci_low"], boot["ci_high"],
                                   True, ok))
    return out


def rule_worst_group(groups: Sequence[GroupComparison], cfg: GateConfig) -> Rule:
    checked = [g for g in groups if g.checked]
    if not checked:
        return Rule("worst_group", "relative", None, cfg.group_tolerance, True,
                    f"no group has >= {cfg.min_group_utts} utterances: nothing to check",
                    {"groups_checked": 0})
    failing = [g for g in checked if not g.passed]
    broken = [g for g in failing if g.ci_high is None or not math.isfinite(g.ci_high)]
    if broken:
        g = broken[0]
        return Rule("worst_group", "relative", None, cfg.group_tolerance, False,
                    f"group {g.key}: {g.note}", {"group": g.key, "groups_checked": len(checked),
                                                 "failing_groups": [x.key for x in failing]})
    worst = max(checked, key=lambda g: g.ci_high)
    detail = (f"worst group {worst.key}: ΔWER {_pp(worst.delta)}, CI upper {_pp(worst.ci_high)} "
              f"(candidate {_pct(worst.candidate_wer)} vs production {_pct(worst.production_wer)}, "
              f"{worst.n_utts} utts); every checked group's upper bound must be <= {_pp(cfg.group_tolerance)}")
    if failing:
        names = ", ".join(g.key for g in sorted(failing, key=lambda g: -g.ci_high)[:8])
        detail += f"; {len(failing)} of {len(checked)} checked groups fail: {names}" + (" ..." if len(failing) > 8 else "")
    return Rule("worst_group", "relative", worst.ci_high, cfg.group_tolerance, not failing, detail,
                {"group": worst.key, "groups_checked": len(checked), "failing_groups": [g.key for g in failing]})


def check_force_reason(force_reason: str | None) -> str | None:
    """``None`` (no force) or the stripped reason; an empty reason is refused."""
    if force_reason is None:
        return None
    if not isinstance(force_reason, str) or not force_reason.strip():
        raise ValueError("forcing the gate needs a non-empty reason (--force-reason '...'); it is recorded "
                         "in the decision, the report and the registry")
    return force_reason.strip()


@dataclass
class Outcome:
    """The decision plus what the report draws (bootstrap samples, group table)."""

    decision: dict[str, Any]
    rules: list[Rule]
    groups: list[GroupComparison]
    bootstrap: dict[str, Any] | None


def decide(
    candidate: Sequence[UttScore],
    production: Sequence[UttScore] | None,
    *,
    candidate_rtf: float,
    cfg: GateConfig,
    cohorts: Mapping[str, str] | None = None,
    force_reason: str | None = None,
    forced_by: str | None = None,
) -> Outcome:
    """Apply every rule; ``production=None`` is a cold start (absolute rules only)."""
    reason = check_force_reason(force_reason)
    cold = production is None
    rules = [rule_finite_outputs(candidate), rule_wer_ceiling(wer_of(candidate), cfg.max_wer),
             rule_rtf(candidate_rtf, cfg.max_rtf)]
    if cfg.max_group_wer is not None:
        rules.append(rule_group_ceiling(candidate, cfg, cohorts))
    groups = compare_groups(candidate, production, cfg, cohorts)
    boot = None
    skipped = []
    if cold:
        skipped = [{"name": n, "reason": "cold start: no production model to compare with"}
                   for n in ("coverage", "delta_wer", "worst_group")]
    else:
        cand, prod, missing = _pair(candidate, production)
        rules.append(rule_coverage(missing))
        boot = bootstrap_delta(cand, prod, cfg, cfg.seed)
        rules.append(rule_delta_wer(boot, cfg))
        rules.append(rule_worst_group(groups, cfg))
    rules_passed = all(r.passed for r in rules)
    failing = [r.name for r in rules if not r.passed]
    decision = {
        "passed": rules_passed or reason is not None,
        "rules_passed": rules_passed,
        "failing_rules": failing,
        "rules": [r.to_dict() for r in rules],
        "skipped_rules": skipped,
        "mode": cfg.mode,
        "cold_start": cold,
        "forced": reason is not None,
        "force_reason": reason,
        "forced_by": forced_by if reason is not None else None,
        "bootstrap": None if boot is None else {
            k: _finite(float(boot[k])) for k in ("delta", "ci_low", "ci_high", "confidence")
        } | {"n_resamples": cfg.bootstrap_resamples, "seed": cfg.seed},
        "groups": [g.to_dict() for g in groups],
    }
    return Outcome(decision, rules, groups, boot)


# --------------------------------------------------------------------------- the stage


def read_cohorts(manifest_text: str) -> dict[str, str]:
    """utt_id -> ``seen``/``unseen`` from the golden manifest's ``seen`` flags (absent: no cohort)."""
    out = {}
    for line in manifest_text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if isinstance(rec.get("seen"), bool) and "utt_id" in rec:
            out[rec["utt_id"]] = "seen" if rec["seen"] else "unseen"
    return out


def utt_rows(utts: Sequence[UttScore]) -> str:
    from dataclasses import asdict

    return "".join(json.dumps(asdict(u), sort_keys=True) + "\n" for u in utts)


def _actor(actor: str | None) -> str:
    from pipeline.stages.register import _actor as registry_actor

    return registry_actor(actor)


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
    cfg = settings or gate_config(ctx.config)

    def body() -> dict[str, Any]:
        return _run_gate(ctx, cfg, candidate_key or ctx.stage_key("train", "model.pt"), reason, _actor(actor))

    return ctx.run_stage(STAGE, body, force=reason is not None)


def _run_gate(ctx: Any, cfg: GateConfig, candidate_key: str, reason: str | None, actor: str) -> dict[str, Any]:
    from pipeline.stages import register as registry
    from pipeline.stages.gate import report
    from pipeline.asr.evaluation import evaluate_model
    from pipeline.asr.export import load_exported
    from pipeline.storage import join

    store = ctx.store
    version = cfg.golden_version or ctx.config.demo.golden_version
    manifest_key = join("golden", version, "manifest.jsonl")
    if not store.exists(manifest_key):
        raise FileNotFoundError(
            f"golden set {version!r} not found at {store.uri(manifest_key)}: build it ('asr-retune demo-data') "
            "or set gate.golden_version"
        )
    cohorts = read_cohorts(store.get_text(manifest_key))
    local_candidate = os.path.isfile(candidate_key)
    if not local_candidate and not store.exists(candidate_key):
        raise FileNotFoundError(
            f"no candidate model at {store.uri(candidate_key)}: run the train stage for run {ctx.run_id} "
            "first, or pass --candidate KEY"
        )
    production = registry.production_model(ctx.config.mlflow)
    with tempfile.TemporaryDirectory() as tmp:
        cand_path = Path(tmp) / "candidate.pt"
        registry._fetch(store, candidate_key, cand_path)
        cand_sha = registry.sha256_file(cand_path)
        cand_model = load_exported(cand_path)
        cand_eval = evaluate_model(cand_model, store, manifest_key, batch_size=cfg.batch_size)
        prod_eval = None
        if production is not None:
            prod_eval = evaluate_model(load_exported(production.path), store, manifest_key, batch_size=cfg.batch_size)
    cand_summary = cand_eval.summary()
    prod_summary = prod_eval.summary() if prod_eval else None
    outcome = decide(
        cand_eval.utts, prod_eval.utts if prod_eval else None,
        candidate_rtf=cand_summary["rtf"], cfg=cfg, cohorts=cohorts, force_reason=reason, forced_by=actor,
    )
    prefix = ctx.stage_prefix(STAGE)
    keys = {name: join(prefix, name) for name in (DECISION, "report.html", "report.md", "candidate_utts.jsonl",
                                                   "production_utts.jsonl", "bootstrap.json")}
    meta_key = join("golden", version, "meta.json")
    decision = {
        "run_id": ctx.run_id,
        "decided_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **outcome.decision,
        "candidate": {
            "key": candidate_key,
            "uri": candidate_key if local_candidate else store.uri(candidate_key),
            "sha256": cand_sha,
            **_brief(cand_summary),
            "model_meta": {k: v for k, v in cand_model.meta.items() if k not in ("tokens", "frontend")},
        },
        "production": None if production is None else {
            "model": production.name,
            "version": production.version,
            "model_uri": production.uri,
            "run_id": production.run_id,
            "sha256": production.tags.get(registry.TAG_SHA256),
            **_brief(prod_summary),
        },
        "golden": {
            "version": version,
            "manifest_uri": store.uri(manifest_key),
            "meta": json.loads(store.get_text(meta_key)) if store.exists(meta_key) else None,
            "n_utts": cand_summary["n_utts"],
            "n_words": cand_summary["n_words"],
            "cohorts": sorted(set(cohorts.values())),
        },
        "config": cfg.model_dump(mode="json"),
        "decision_uri": store.uri(keys[DECISION]),
        "report_uri": store.uri(keys["report.html"]),
        "report_md_uri": store.uri(keys["report.md"]),
    }
    if isinstance(decision["golden"]["meta"], dict):  # keep the decision small: composition only
        decision["golden"]["meta"] = {k: v for k, v in decision["golden"]["meta"].items()
                                      if not isinstance(v, (list, dict)) or k in ("held_out_speakers", "held_out_voices")}
    store.put_text(keys[DECISION], json.dumps(decision, indent=2, sort_keys=True, allow_nan=False) + "\n")
    store.put_text(keys["candidate_utts.jsonl"], utt_rows(cand_eval.utts))
    if prod_eval is not None:
        store.put_text(keys["production_utts.jsonl"], utt_rows(prod_eval.utts))
    samples = [] if outcome.bootstrap is None else [float(x) for x in outcome.bootstrap["samples"] if math.isfinite(x)]
    store.put_text(keys["bootstrap.json"], json.dumps({"samples": samples}) + "\n")

    notes: list[str] = []
    leaderboard = _optional_json(store, ctx.stage_key("search", "leaderboard.json"), notes)
    train_history = _optional_json(store, ctx.stage_key("train", "history.json"), notes)
    inputs = report.ReportInputs(
        decision=decision,
        candidate=cand_eval.utts,
        production=prod_eval.utts if prod_eval else None,
        bootstrap_samples=samples,
        leaderboard=leaderboard,
        history=train_history,
        notes=notes,
        top_utts=cfg.report_top_utts,
        leaderboard_rows=cfg.report_leaderboard_rows,
    )
    html, md = report.render_html(inputs), report.render_markdown(inputs)
    store.put_text(keys["report.html"], html)
    store.put_text(keys["report.md"], md)

    metrics = {"gate.passed": float(decision["passed"]), "golden.candidate_wer": cand_summary["wer"],
               "golden.candidate_cer": cand_summary["cer"], "golden.candidate_rtf": cand_summary["rtf"]}
    if prod_summary:
        metrics["golden.production_wer"] = prod_summary["wer"]
    if decision["bootstrap"]:
        for k in ("delta", "ci_low", "ci_high"):
            metrics[f"golden.delta_wer.{k}"] = decision["bootstrap"][k]
    for g in outcome.groups:
        metrics[f"golden.group_wer.{g.key}"] = g.candidate_wer
    tags = {"gate.passed": str(decision["passed"]).lower(), "gate.cold_start": str(outcome.decision["cold_start"]).lower(),
            "gate.forced": str(decision["forced"]).lower(), registry.TAG_GOLDEN: version}
    if reason:
        tags["gate.force_reason"] = reason
        tags["gate.forced_by"] = actor
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in (DECISION, "report.html", "report.md"):
            files[name] = Path(tmp) / name
            files[name].write_text(store.get_text(keys[name]), encoding="utf-8")
        mlflow_run = registry.log_gate(ctx, files, metrics, tags)

    return {
        "passed": decision["passed"],
        "rules_passed": decision["rules_passed"],
        "failing_rules": decision["failing_rules"],
        "cold_start": decision["cold_start"],
        "forced": decision["forced"],
        "mode": cfg.mode,
        "candidate_wer": _finite(cand_summary["wer"]),
        "production_wer": _finite(prod_summary["wer"]) if prod_summary else None,
        "production_version": production.version if production else None,
        "golden_version": version,
        "decision_uri": decision["decision_uri"],
        "report_uri": decision["report_uri"],
        "report_md_uri": decision["report_md_uri"],
        "mlflow_run_id": mlflow_run,
    }


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: _finite(summary[k]) for k in ("wer", "cer", "rtf", "n_utts", "n_words")}


def _optional_json(store: Any, key: str, notes: list[str]) -> Any:
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
