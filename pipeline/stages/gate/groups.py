"""Per-group comparison for the gate: which groups an utterance is in, each group's paired ΔWER
with a Holm–Bonferroni adjusted interval, its minimum detectable effect and its verdict.

Groups: ``speaker:NAME``, ``group:ACCENT``, ``cohort:seen|unseen`` (the golden manifest's
``seen`` flag) and ``condition:NAME`` (its ``condition`` field; absent: no condition group).

For every group production was scored on, both models' utterances of that group are
compared with the blockwise bootstrap (:func:`pipeline.asr.metrics.blockwise_bootstrap`,
speakers as blocks; a speaker group is one block, i.e. utterance resampling). Groups with
>= ``min_group_utts`` utterances are *checked*: they form the family of m tests.

* p-value of group g: the share of its bootstrap ΔWER samples <= 0 (one-sided: "g regressed").
* Holm step-down: the groups in ascending p order; rank i (1-based) gets the level
  alpha_i = alpha / (m - i + 1), alpha = 1 - ``confidence``, and its interval is the
  (1 - alpha_i) percentile interval. Walking the ranks, a group's interval "lies above zero"
  when its lower bound is > 0 and every earlier rank's did too; from the first rank whose
  interval does not, every later rank keeps that rank's level (so no later group is
  rejected and every shown interval agrees with its verdict).
* verdict ``regression`` (the group fails): its interval lies above zero AND its ΔWER >
  ``group_tolerance``. Otherwise ``too small to tell`` when it has < ``min_group_utts``
  utterances (not checked), or when its minimum detectable effect exceeds ``max_group_mde``
  and its interval does not lie below zero (a group that shows an improvement has shown
  something), else ``no evidence of regression``. Neither of the last two fails the gate; a group
  production had that the candidate lacks, or a NaN group WER, fails (``missing``).
* MDE of group g (:func:`pipeline.asr.metrics.minimum_detectable_effect`): the true ΔWER
  the rule flags with probability ``power``, at the Bonferroni level alpha / m (what Holm's
  first step needs) with ``group_tolerance`` as the floor, from the spread of g's bootstrap
  samples plus the binomial noise of the added errors over g's words.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.asr.metrics import UttScore, blockwise_bootstrap, interval, minimum_detectable_effect, share_at_or_below
from pipeline.config import GateConfig

REGRESSION = "regression"
NO_EVIDENCE = "no evidence of regression"
TOO_SMALL = "too small to tell"
MISSING = "missing"
NOT_COMPARED = "not compared"


def finite_or_none(x: Any) -> Any:
    """``x``, or ``None`` for a NaN/Inf float (the decision file never holds NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def wer_of(utts: Sequence[UttScore]) -> float:
    words = sum(u.ref_words for u in utts)
    return sum(u.errors for u in utts) / words if words else math.nan


def group_keys(u: UttScore, cohorts: Mapping[str, str] | None = None,
               conditions: Mapping[str, str] | None = None) -> list[str]:
    """The groups an utterance belongs to: speaker, accent group, seen/unseen cohort, recording condition."""
    keys = [f"speaker:{u.speaker}", f"group:{u.group}"]
    if cohorts and u.utt_id in cohorts:
        keys.append(f"cohort:{cohorts[u.utt_id]}")
    if conditions and u.utt_id in conditions:
        keys.append(f"condition:{conditions[u.utt_id]}")
    return keys


def groups_of(utts: Sequence[UttScore], cohorts: Mapping[str, str] | None = None,
              conditions: Mapping[str, str] | None = None) -> dict[str, list[UttScore]]:
    out: dict[str, list[UttScore]] = defaultdict(list)
    for u in utts:
        for k in group_keys(u, cohorts, conditions):
            out[k].append(u)
    return dict(sorted(out.items()))


@dataclass
class GroupComparison:
    key: str
    n_utts: int
    n_words: int
    candidate_wer: float
    production_wer: float | None
    delta: float | None
    ci_low: float | None  # the Holm-adjusted interval (confidence below)
    ci_high: float | None
    checked: bool
    passed: bool | None  # False: fails the gate; None: neither passed nor failed (too small, not compared)
    note: str = ""
    verdict: str = NOT_COMPARED
    confidence: float | None = None  # the adjusted confidence of the interval
    p_value: float | None = None
    se: float | None = None
    mde: float | None = None
    n_speakers: int = 0
    above_zero: bool = False  # Holm step-down: the adjusted interval lies above zero
    samples: Any = None  # the bootstrap ΔWER samples (not in the decision file)

    @property
    def kind(self) -> str:
        return self.key.split(":", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        f = finite_or_none
        return {
            "key": self.key, "kind": self.kind, "n_utts": self.n_utts, "n_words": self.n_words,
            "n_speakers": self.n_speakers, "candidate_wer": f(self.candidate_wer),
            "production_wer": f(self.production_wer), "delta": f(self.delta), "ci_low": f(self.ci_low),
            "ci_high": f(self.ci_high), "confidence": f(self.confidence), "p_value": f(self.p_value),
            "se": f(self.se), "mde": f(self.mde), "checked": self.checked, "passed": self.passed,
            "above_zero": self.above_zero, "verdict": self.verdict, "note": self.note,
        }


def group_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31)


def compare_groups(
    candidate: Sequence[UttScore],
    production: Sequence[UttScore] | None,
    cfg: GateConfig,
    cohorts: Mapping[str, str] | None = None,
    conditions: Mapping[str, str] | None = None,
) -> list[GroupComparison]:
    """Every group's comparison and verdict (module docstring); a cold start compares nothing."""
    cand_groups = groups_of(candidate, cohorts, conditions)
    if production is None:
        return [_shown_only(k, u, "cold start") for k, u in cand_groups.items()]
    prod_groups = groups_of(production, cohorts, conditions)
    by_id = {u.utt_id: u for u in candidate}
    out = []
    for key in sorted(set(cand_groups) | set(prod_groups)):
        prod_u = prod_groups.get(key, [])
        if not prod_u:  # a group only the candidate has: shown, nothing to compare
            out.append(_shown_only(key, cand_groups[key], "not in production's evaluation"))
            continue
        out.append(_compare_one(key, prod_u, by_id, cfg))
    _holm(out, cfg)
    _verdicts(out, cfg)
    return out


def _shown_only(key: str, utts: Sequence[UttScore], note: str) -> GroupComparison:
    return GroupComparison(key, len(utts), sum(x.ref_words for x in utts), wer_of(utts), None, None, None, None,
                           False, None, note, n_speakers=len({u.speaker for u in utts}))


def _compare_one(key: str, prod_u: list[UttScore], by_id: Mapping[str, UttScore], cfg: GateConfig) -> GroupComparison:
    """One group's paired comparison, before adjustment (interval and verdict are set by the family)."""
    cand_u = [by_id[p.utt_id] for p in prod_u if p.utt_id in by_id]
    n_words = sum(p.ref_words for p in prod_u)
    cw, pw = wer_of(cand_u), wer_of(prod_u)
    g = GroupComparison(key, len(prod_u), n_words, cw, pw, None, None, None, len(prod_u) >= cfg.min_group_utts,
                        None, n_speakers=len({p.speaker for p in prod_u}))
    if len(cand_u) < len(prod_u) or not math.isfinite(cw) or not math.isfinite(pw):
        g.note = ("the candidate lacks this group's utterances" if len(cand_u) < len(prod_u)
                  else "NaN WER (no reference words)")
        g.verdict, g.passed, g.checked = MISSING, False, True
        return g
    boot = blockwise_bootstrap([c.errors for c in cand_u], [p.errors for p in prod_u], [p.ref_words for p in prod_u],
                               [p.speaker for p in prod_u], n_resamples=cfg.bootstrap_resamples,
                               seed=group_seed(cfg.seed, key), confidence=cfg.confidence)
    g.delta, g.se, g.samples = boot["delta"], boot["se"], boot["samples"]
    g.p_value = share_at_or_below(g.samples, 0.0)
    return g


def _holm(groups: list[GroupComparison], cfg: GateConfig) -> None:
    """Adjusted level, interval and rejection ("lies above zero") of every bootstrapped group (docstring)."""
    alpha = 1 - cfg.confidence
    family = sorted((g for g in groups if g.checked and g.samples is not None),
                    key=lambda g: (g.p_value if g.p_value is not None and math.isfinite(g.p_value) else 2.0, g.key))
    m = len(family)
    level, still_rejecting = alpha, True
    for rank, g in enumerate(family):
        if still_rejecting:
            level = alpha / (m - rank)
        g.confidence = 1 - level
        g.ci_low, g.ci_high = interval(g.samples, g.confidence)
        still_rejecting = still_rejecting and math.isfinite(g.ci_low) and g.ci_low > 0
        g.above_zero = still_rejecting
    for g in groups:  # groups outside the family: their interval at the unadjusted confidence
        if g.samples is not None and not g.checked:
            g.confidence = cfg.confidence
            g.ci_low, g.ci_high = interval(g.samples, g.confidence)
    for g in groups:
        if g.samples is not None:
            g.mde = minimum_detectable_effect(g.se if g.se is not None else math.nan, g.n_words,
                                              alpha=alpha / max(1, m), power=cfg.power, margin=cfg.group_tolerance)


def _verdicts(groups: list[GroupComparison], cfg: GateConfig) -> None:
    for g in groups:
        if g.samples is None:
            continue
        mde = f"detects >= {100 * g.mde:.1f} pts" if g.mde is not None and math.isfinite(g.mde) else "no spread"
        if g.checked and g.above_zero and g.delta is not None and g.delta > cfg.group_tolerance:
            g.verdict, g.passed = REGRESSION, False
            g.note = f"adjusted {100 * (g.confidence or 0):.2f}% interval above zero and ΔWER above the tolerance"
        elif not g.checked:
            g.verdict, g.passed = TOO_SMALL, None
            g.note = f"< {cfg.min_group_utts} utterances: not checked ({mde})"
        elif (g.mde is not None and math.isfinite(g.mde) and g.mde > cfg.max_group_mde
              and not (g.ci_high is not None and g.ci_high < 0)):
            g.verdict, g.passed = TOO_SMALL, None
            g.note = mde
        else:
            g.verdict, g.passed = NO_EVIDENCE, True
            g.note = mde


def family_size(groups: Sequence[GroupComparison]) -> int:
    return sum(1 for g in groups if g.checked and g.samples is not None)
