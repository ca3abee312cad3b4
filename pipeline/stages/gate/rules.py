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
  ``delta_wer`` (paired bootstrap CI of candidate - production WER, resampling utterances;
  ``improve`` mode passes if the upper bound <= -``min_improvement``, ``non-regression``
  mode if it is <= +``tolerance``) and ``worst_group`` (for every speaker, accent group and
  seen/unseen cohort with >= ``min_group_utts`` utterances, the upper bound of that group's
  paired-bootstrap ΔWER <= ``group_tolerance``; a group production had that the candidate
  lacks, or a NaN group WER, fails).

A manual force (a reason, never the default) passes a failed gate; :func:`check_force`
and :func:`check_force_reason` refuse one without a reason, :func:`failing_rules` names
what failed.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.asr.metrics import UttScore, format_pct, format_points, paired_bootstrap
from pipeline.config import GateConfig


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


def finite_or_none(x: Any) -> Any:
    """``x``, or ``None`` for a NaN/Inf float (the decision file never holds NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _le(value: float | None, threshold: float) -> bool:
    """value <= threshold, and NaN/None never passes."""
    return value is not None and math.isfinite(value) and value <= threshold + 1e-12


def wer_of(utts: Sequence[UttScore]) -> float:
    words = sum(u.ref_words for u in utts)
    return sum(u.errors for u in utts) / words if words else math.nan


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
        want = f"must be <= {format_points(threshold)} (improve mode: better by a margin the noise cannot explain)"
    else:
        threshold = cfg.tolerance
        want = f"must be <= {format_points(threshold)} (non-regression mode)"
    ok = _le(upper, threshold)
    detail = (f"ΔWER {format_points(boot['delta'])}, {conf} CI [{format_points(boot['ci_low'])}, {format_points(upper)}]; upper bound {want}")
    if not math.isfinite(upper):
        detail = "ΔWER is NaN (no paired words): fails"
    return Rule("delta_wer", "relative", upper, threshold, ok, detail,
                {"delta": finite_or_none(float(boot["delta"])), "ci_low": finite_or_none(float(boot["ci_low"])),
                 "ci_high": finite_or_none(upper), "mode": cfg.mode})


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
            "candidate_wer": finite_or_none(self.candidate_wer), "production_wer": finite_or_none(self.production_wer),
            "delta": finite_or_none(self.delta), "ci_low": finite_or_none(self.ci_low), "ci_high": finite_or_none(self.ci_high),
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
    detail = (f"worst group {worst.key}: ΔWER {format_points(worst.delta)}, CI upper {format_points(worst.ci_high)} "
              f"(candidate {format_pct(worst.candidate_wer)} vs production {format_pct(worst.production_wer)}, "
              f"{worst.n_utts} utts); every checked group's upper bound must be <= {format_points(cfg.group_tolerance)}")
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
            k: finite_or_none(float(boot[k])) for k in ("delta", "ci_low", "ci_high", "confidence")
        } | {"n_resamples": cfg.bootstrap_resamples, "seed": cfg.seed},
        "groups": [g.to_dict() for g in groups],
    }
    return Outcome(decision, rules, groups, boot)
