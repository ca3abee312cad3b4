"""The gate's rules: pure functions of per-utterance error counts, and :func:`decide`.

Thresholds come from :class:`~pipeline.config.GateConfig`; nothing here touches a model,
the store or MLflow, so every rule is tested on synthetic scores.

* absolute: ``finite_outputs`` (the candidate's outputs held no NaN/Inf on any golden
  utterance: a damaged model fails even where its transcripts happen to score well),
  ``wer_ceiling`` (candidate WER <= ``max_wer``; NaN fails), ``rtf_budget``
  (real-time factor <= ``max_rtf``) and, if set, ``group_wer_ceiling`` (every group with
  >= ``min_group_utts`` utterances <= ``max_group_wer``);
* relative to production (skipped on a cold start, which the decision and report say):
  ``coverage`` (the candidate was scored on every utterance production was),
  ``delta_wer`` and ``worst_group``.

``delta_wer``: ΔWER = WER(candidate) − WER(production) with its paired *blockwise*
bootstrap interval at ``confidence`` (speakers resampled, then utterances within each;
:func:`pipeline.asr.metrics.blockwise_bootstrap`). The utterance-level interval is shown
beside it and decides nothing.

* ``improve`` mode passes when the upper bound <= −``min_improvement``: better by a margin
  the noise of the golden set cannot explain (a copy of production fails).
* ``non-regression`` mode passes when there is no evidence of regression — the lower bound
  <= 0 — AND the point estimate ΔWER <= +``tolerance``. Asking for the upper bound to be
  under a tolerance instead would fail a copy of production whenever the interval is wider
  than the tolerance; asking only for no evidence would pass any regression the golden set is
  too small to prove. With tolerance = half the smallest regression that must be blocked
  (0.5 pts for 1 pt), both error rates are Φ(−0.5 pt / SE): ≤ 5 % when SE ≤ 0.3 pts.
  ``tests/benchmarks/bench_gate.py`` measures them on real models.

``worst_group``: fails only on evidence of regression in some group — its ΔWER >
``group_tolerance`` and its Holm–Bonferroni adjusted interval lies above zero
(:mod:`pipeline.stages.gate.groups`); groups too small to tell are reported with their
minimum detectable effect and neither pass nor fail.

The decision also says what the golden set can detect (``detectability``): the overall
regression the non-regression rule blocks and the improvement the improve rule ships, each
with probability ``power`` (:func:`pipeline.asr.metrics.minimum_detectable_effect`), and
every group's MDE.

A manual force (a reason, never the default) passes a failed gate; :func:`check_force`
and :func:`check_force_reason` refuse one without a reason, :func:`failing_rules` names
what failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.asr.metrics import (
    UttScore,
    blockwise_bootstrap,
    format_pct,
    format_points,
    minimum_detectable_effect,
    paired_bootstrap,
)
from pipeline.config import GateConfig
from pipeline.stages.gate.groups import (
    MISSING,
    REGRESSION,
    TOO_SMALL,
    GroupComparison,
    compare_groups,
    family_size,
    finite_or_none,
    groups_of,
    wer_of,
)

__all__ = [
    "GroupComparison", "Outcome", "Rule", "check_force", "check_force_reason", "compare_groups", "decide",
    "failing_rules", "finite_or_none", "wer_of",
]


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
            "value": finite_or_none(self.value),
            "threshold": self.threshold,
            "comparison": "<=",
            "passed": self.passed,
            "detail": self.detail,
            **self.extra,
        }


def _le(value: float | None, threshold: float) -> bool:
    """value <= threshold, and NaN/None never passes."""
    return value is not None and math.isfinite(value) and value <= threshold + 1e-12


def rule_wer_ceiling(wer: float, max_wer: float) -> Rule:
    ok = _le(wer, max_wer)
    detail = f"candidate WER {format_pct(wer)} vs ceiling {format_pct(max_wer)}"
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


def rule_group_ceiling(candidate: Sequence[UttScore], cfg: GateConfig, cohorts: Mapping[str, str] | None,
                       conditions: Mapping[str, str] | None = None) -> Rule:
    assert cfg.max_group_wer is not None
    worst_key, worst = None, -math.inf
    for key, utts in groups_of(candidate, cohorts, conditions).items():
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
                f"worst group {worst_key}: WER {format_pct(worst)} vs ceiling {format_pct(cfg.max_group_wer)}",
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


def _empty_boot(cfg: GateConfig, method: str) -> dict[str, Any]:
    return {"delta": math.nan, "ci_low": math.nan, "ci_high": math.nan, "confidence": cfg.confidence,
            "n_resamples": cfg.bootstrap_resamples, "method": method, "n_blocks": 0, "se": math.nan,
            "samples": np.array([])}


def bootstrap_delta(cand: Sequence[UttScore], prod: Sequence[UttScore], cfg: GateConfig, seed: int, *,
                    blockwise: bool = True) -> dict[str, Any]:
    """Paired bootstrap of WER(candidate) - WER(production): blockwise by speaker (the rule's) or by
    utterance (shown beside it); NaN bounds when there are no words."""
    words = [p.ref_words for p in prod]
    if not cand or sum(words) == 0:
        return _empty_boot(cfg, "blockwise" if blockwise else "utterance")
    ea, eb = [c.errors for c in cand], [p.errors for p in prod]
    kw = {"n_resamples": cfg.bootstrap_resamples, "seed": seed, "confidence": cfg.confidence}
    if blockwise:
        return blockwise_bootstrap(ea, eb, words, [p.speaker for p in prod], **kw)
    return paired_bootstrap(ea, eb, words, **kw)


def rule_coverage(missing: Sequence[str]) -> Rule:
    n = len(missing)
    shown = ", ".join(list(missing)[:5]) + (" ..." if n > 5 else "")
    return Rule("coverage", "relative", float(n), 0.0, n == 0,
                "candidate scored on every utterance production was" if n == 0
                else f"candidate lacks {n} utterance(s) production was scored on: {shown}")


def rule_delta_wer(boot: Mapping[str, Any], cfg: GateConfig, utt_boot: Mapping[str, Any] | None = None) -> Rule:
    """Improve: upper bound <= -min_improvement. Non-regression: lower bound <= 0 and ΔWER <= tolerance."""
    delta, lower, upper = (float(boot[k]) for k in ("delta", "ci_low", "ci_high"))
    conf = f"{100 * cfg.confidence:.0f}%"
    ci = f"ΔWER {format_points(delta)}, {conf} blockwise CI [{format_points(lower)}, {format_points(upper)}]"
    if utt_boot is not None:
        ci += f" (utterance-level [{format_points(utt_boot['ci_low'])}, {format_points(utt_boot['ci_high'])}])"
    if cfg.mode == "improve":
        value, threshold = upper, -cfg.min_improvement
        ok = _le(upper, threshold)
        want = f"upper bound must be <= {format_points(threshold)} (improve mode: better by a margin the noise cannot explain)"
    else:
        value, threshold = delta, cfg.tolerance
        ok = _le(delta, threshold) and _le(lower, 0.0)
        want = (f"non-regression mode: ΔWER must be <= {format_points(threshold)} and the lower bound <= 0 "
                "(no evidence of regression)")
    detail = f"{ci}; {want}"
    if not all(math.isfinite(x) for x in (delta, lower, upper)):
        ok, detail = False, "ΔWER is NaN (no paired words): fails"
    extra = {"delta": finite_or_none(delta), "ci_low": finite_or_none(lower), "ci_high": finite_or_none(upper),
             "method": boot.get("method", "blockwise"), "mode": cfg.mode}
    if utt_boot is not None:
        extra |= {"utt_ci_low": finite_or_none(float(utt_boot["ci_low"])),
                  "utt_ci_high": finite_or_none(float(utt_boot["ci_high"]))}
    return Rule("delta_wer", "relative", value, threshold, ok, detail, extra)


def rule_worst_group(groups: Sequence[GroupComparison], cfg: GateConfig) -> Rule:
    """Fails when some group shows evidence of regression, or a group cannot be compared (missing/NaN)."""
    checked = [g for g in groups if g.checked]
    small = [g for g in groups if g.verdict == TOO_SMALL]
    extra: dict[str, Any] = {"groups_checked": len(checked), "family_size": family_size(groups),
                             "too_small_groups": [g.key for g in small]}
    small_text = ""
    if small:
        small_text = f"; {len(small)} group(s) too small to tell: " + ", ".join(
            f"{g.key} (detects >= {format_points(g.mde).replace('+', '')})" for g in small[:6]) + (" ..." if len(small) > 6 else "")
    if not checked:
        return Rule("worst_group", "relative", None, cfg.group_tolerance, True,
                    f"no group has >= {cfg.min_group_utts} utterances: nothing to check{small_text}", extra)
    broken = [g for g in checked if g.verdict == MISSING]
    failing = [g for g in checked if g.verdict in (REGRESSION, MISSING)]
    extra["failing_groups"] = [g.key for g in failing]
    if broken:
        g = broken[0]
        return Rule("worst_group", "relative", None, cfg.group_tolerance, False, f"group {g.key}: {g.note}",
                    {**extra, "group": g.key})
    compared = [g for g in checked if g.delta is not None and math.isfinite(g.delta)]
    regressions = [g for g in checked if g.verdict == REGRESSION]
    worst = max(regressions or compared, key=lambda g: g.delta)
    detail = (f"worst group {worst.key}: ΔWER {format_points(worst.delta)}, adjusted "
              f"{100 * (worst.confidence or cfg.confidence):.2f}% CI [{format_points(worst.ci_low)}, "
              f"{format_points(worst.ci_high)}] (candidate {format_pct(worst.candidate_wer)} vs production "
              f"{format_pct(worst.production_wer)}, {worst.n_utts} utts); a group fails when its ΔWER > "
              f"{format_points(cfg.group_tolerance)} and its Holm-adjusted interval lies above zero")
    if regressions:
        names = ", ".join(g.key for g in sorted(regressions, key=lambda g: -g.delta)[:8])
        detail += (f"; {len(regressions)} of {len(checked)} checked groups show a regression: {names}"
                   + (" ..." if len(regressions) > 8 else ""))
    else:
        detail += f"; no evidence of regression in any of {len(checked)} checked groups"
    return Rule("worst_group", "relative", worst.delta, cfg.group_tolerance, not regressions, detail + small_text,
                {**extra, "group": worst.key})


def check_force_reason(force_reason: str | None) -> str | None:
    """``None`` (no force) or the stripped reason; an empty reason is refused."""
    if force_reason is None:
        return None
    if not isinstance(force_reason, str) or not force_reason.strip():
        raise ValueError("forcing the gate needs a non-empty reason (--force-reason '...'); it is recorded "
                         "in the decision, the report and the registry")
    return force_reason.strip()


def check_force(force_promote: bool, force_reason: str | None) -> str | None:
    """The force reason to pass to the gate (``None`` without ``force_promote``).

    Forcing without a reason is refused before any work: the reason is recorded.
    """
    if force_promote and not (force_reason or "").strip():
        raise ValueError("force_promote needs force_reason: say why the gate is overridden (it is recorded)")
    return force_reason if force_promote else None


def failing_rules(decision: Mapping[str, Any]) -> list[str]:
    """The names of the decision's rules that did not pass, in rule order."""
    return [r["name"] for r in decision.get("rules", []) if not r.get("passed")]


@dataclass
class Outcome:
    """The decision plus what the report draws (bootstrap samples, group table)."""

    decision: dict[str, Any]
    rules: list[Rule]
    groups: list[GroupComparison]
    bootstrap: dict[str, Any] | None  # the blockwise bootstrap (the rule's), with its samples
    utterance_bootstrap: dict[str, Any] | None = None


def decide(
    candidate: Sequence[UttScore],
    production: Sequence[UttScore] | None,
    *,
    candidate_rtf: float,
    cfg: GateConfig,
    cohorts: Mapping[str, str] | None = None,
    conditions: Mapping[str, str] | None = None,
    force_reason: str | None = None,
    forced_by: str | None = None,
) -> Outcome:
    """Apply every rule; ``production=None`` is a cold start (absolute rules only).

    ``cohorts`` and ``conditions`` map utt_id to the golden manifest's seen/unseen cohort and
    recording condition (extra groups ``cohort:*`` and ``condition:*``).
    """
    reason = check_force_reason(force_reason)
    cold = production is None
    rules = [rule_finite_outputs(candidate), rule_wer_ceiling(wer_of(candidate), cfg.max_wer),
             rule_rtf(candidate_rtf, cfg.max_rtf)]
    if cfg.max_group_wer is not None:
        rules.append(rule_group_ceiling(candidate, cfg, cohorts, conditions))
    groups = compare_groups(candidate, production, cfg, cohorts, conditions)
    boot = utt_boot = None
    skipped = []
    if production is None:
        skipped = [{"name": n, "reason": "cold start: no production model to compare with"}
                   for n in ("coverage", "delta_wer", "worst_group")]
    else:
        cand, prod, missing = _pair(candidate, production)
        rules.append(rule_coverage(missing))
        boot = bootstrap_delta(cand, prod, cfg, cfg.seed)
        utt_boot = bootstrap_delta(cand, prod, cfg, cfg.seed, blockwise=False)
        rules.append(rule_delta_wer(boot, cfg, utt_boot))
        rules.append(rule_worst_group(groups, cfg))
    rules_passed = all(r.passed for r in rules)
    decision = {
        "passed": rules_passed or reason is not None,
        "rules_passed": rules_passed,
        "failing_rules": [r.name for r in rules if not r.passed],
        "rules": [r.to_dict() for r in rules],
        "skipped_rules": skipped,
        "mode": cfg.mode,
        "cold_start": cold,
        "forced": reason is not None,
        "force_reason": reason,
        "forced_by": forced_by if reason is not None else None,
        "bootstrap": _boot_summary(boot, cfg),
        "bootstrap_utterance": _boot_summary(utt_boot, cfg),
        "detectability": None if boot is None else detectability(boot, groups, cfg, sum(p.ref_words for p in production or [])),
        "groups": [g.to_dict() for g in groups],
    }
    return Outcome(decision, rules, groups, boot, utt_boot)


def _boot_summary(boot: Mapping[str, Any] | None, cfg: GateConfig) -> dict[str, Any] | None:
    if boot is None:
        return None
    return {k: finite_or_none(float(boot[k])) for k in ("delta", "ci_low", "ci_high", "confidence", "se")} | {
        "n_resamples": cfg.bootstrap_resamples, "seed": cfg.seed, "method": boot["method"],
        "n_blocks": int(boot["n_blocks"])}


def detectability(boot: Mapping[str, Any], groups: Sequence[GroupComparison], cfg: GateConfig,
                  n_words: int) -> dict[str, Any]:
    """What this comparison on this golden set can detect, with probability ``cfg.power``.

    ``regression_mde``: the overall regression the non-regression rule fails (ΔWER > tolerance
    or lower bound > 0: ``rule="or"``); ``improvement_mde``: the overall improvement the improve
    rule passes (upper bound <= -min_improvement: ``rule="shift"``); ``interval_mde``: the
    regression whose interval lies above zero; every compared group's MDE (see
    :mod:`pipeline.stages.gate.groups`). SE: the blockwise bootstrap's spread.
    """
    se, alpha = float(boot["se"]), 1 - cfg.confidence

    def mde(rule: str, margin: float) -> float | None:
        return finite_or_none(minimum_detectable_effect(se, n_words, alpha=alpha, power=cfg.power, margin=margin,
                                                        rule=rule))

    with_mde = [g for g in groups if g.mde is not None and math.isfinite(g.mde)]
    return {
        "power": cfg.power,
        "se": finite_or_none(se),
        "regression_mde": mde("or", cfg.tolerance),
        "improvement_mde": mde("shift", cfg.min_improvement),
        "interval_mde": mde("and", 0.0),
        "group_mde": {g.key: finite_or_none(g.mde) for g in with_mde},
        "groups_too_small": [g.key for g in groups if g.verdict == TOO_SMALL],
        "max_group_mde": cfg.max_group_mde,
        "family_size": family_size(groups),
    }
