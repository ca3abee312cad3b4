"""Scoring: WER and CER with jiwer over the shared normalizer, per utterance and per group,
and the statistics of a difference of WERs between two models scored on the same utterances.

One definition of "an error" for evaluation, training's dev WER and the canary:
substitutions + deletions + insertions against the normalized reference, counted by
jiwer. :func:`score_pairs` refuses an empty reference (a golden or dev utterance must say
something); :func:`word_errors` scores it as nothing to get wrong (a canary request may
carry no reference text).

Differences (ΔWER = WER(a) − WER(b), paired: every resample scores both models on the same
draw): :func:`paired_bootstrap` resamples single utterances; :func:`blockwise_bootstrap`
resamples speakers, then utterances within each drawn speaker (Bisani & Ney 2004), which
is the honest interval when one speaker's utterances are correlated. :func:`interval`,
:func:`share_at_or_below` (a one-sided bootstrap p-value), :func:`holm_alphas` and
:func:`minimum_detectable_effect` are the pieces the gate builds its rules from.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from statistics import NormalDist
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jiwer
import numpy as np

from pipeline.data.text import normalize_text


def _counts(ref_n: str, hyp_n: str) -> tuple[int, int]:
    w = jiwer.process_words(ref_n, hyp_n)
    return w.substitutions + w.deletions + w.insertions, w.substitutions + w.deletions + w.hits


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word errors, reference words); an empty reference scores (0, 0)."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return 0, 0
    if not hyp:
        return len(ref.split()), len(ref.split())
    return _counts(ref, hyp)


@dataclass
class UttScore:
    utt_id: str
    speaker: str
    group: str
    reference: str
    hypothesis: str
    errors: int  # substitutions + deletions + insertions
    ref_words: int
    char_errors: int
    ref_chars: int
    finite: bool = True  # False: the model's outputs held NaN/Inf for this utterance


@dataclass
class EvalResult:
    utts: list[UttScore]
    audio_seconds: float
    compute_seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self, min_group_utts: int = 1) -> dict[str, Any]:
        errors = sum(u.errors for u in self.utts)
        words = sum(u.ref_words for u in self.utts)
        cerr = sum(u.char_errors for u in self.utts)
        chars = sum(u.ref_chars for u in self.utts)
        return {
            "wer": errors / words if words else math.nan,
            "cer": cerr / chars if chars else math.nan,
            "n_utts": len(self.utts),
            "n_words": words,
            "nonfinite_utts": sum(not u.finite for u in self.utts),
            "per_group": group_wers(self.utts, min_group_utts),
            "rtf": self.compute_seconds / self.audio_seconds if self.audio_seconds else math.nan,
            "audio_seconds": round(self.audio_seconds, 3),
            "compute_seconds": round(self.compute_seconds, 3),
        }


def score_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> list[tuple[int, int, int, int]]:
    """(word errors, reference words, char errors, reference chars) per pair, computed by jiwer."""
    out = []
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_n, hyp_n = normalize_text(ref), normalize_text(hyp)
        if not ref_n:
            raise ValueError(f"empty reference after normalization: {ref!r}")
        errors, words = _counts(ref_n, hyp_n)
        c = jiwer.process_characters(ref_n, hyp_n)
        out.append(
            (
                errors,
                words,
                c.substitutions + c.deletions + c.insertions,
                c.substitutions + c.deletions + c.hits,
            )
        )
    return out


def group_wers(utts: Sequence[UttScore], min_utts: int = 1) -> dict[str, dict[str, Any]]:
    """WER per speaker (``speaker:NAME``) and per accent group (``group:NAME``), with counts."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for u in utts:
        for key in (f"speaker:{u.speaker}", f"group:{u.group}"):
            acc[key][0] += u.errors
            acc[key][1] += u.ref_words
            acc[key][2] += 1
    return {
        k: {"wer": e / w if w else math.nan, "n_utts": n, "n_words": w}
        for k, (e, w, n) in sorted(acc.items())
        if n >= min_utts
    }


def paired_bootstrap(
    errors_a: Sequence[int],
    errors_b: Sequence[int],
    words: Sequence[int],
    *,
    blocks: Sequence[Any] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """CI of WER(a) - WER(b), paired (both models scored on the same draws).

    Without ``blocks``: utterances resampled with replacement. With ``blocks`` (speakers):
    one resample draws S blocks with replacement out of the S there are; a block drawn
    ``c`` times contributes ``c`` independent resamples (``n_k`` draws with replacement)
    of its own ``n_k`` utterances. With one block it is the utterance-level bootstrap of that block.
    """
    ea, eb, w = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, words))
    if not (len(ea) == len(eb) == len(w)) or len(w) == 0 or (blocks is not None and len(blocks) != len(w)):
        raise ValueError("paired bootstrap needs equally long, non-empty per-utterance arrays (and blocks)")
    if blocks is None:
        deltas = _resampled_deltas(_utterance_plan(len(w), n_resamples, seed), ea, eb, w)
        return _boot_result(ea, eb, w, deltas, confidence, method="utterance", n_blocks=len(w))
    _, code = np.unique(np.asarray([str(b) for b in blocks]), return_inverse=True)
    plan = _block_plan(np.ascontiguousarray(code, dtype=np.int64).tobytes(), n_resamples, seed)
    deltas = _resampled_deltas(plan, ea, eb, w)
    return _boot_result(ea, eb, w, deltas, confidence, method="blockwise", n_blocks=int(code.max()) + 1)


def blockwise_bootstrap(errors_a: Sequence[int], errors_b: Sequence[int], words: Sequence[int],
                        blocks: Sequence[Any], **options: Any) -> dict[str, Any]:
    """The paired bootstrap resampling ``blocks`` (speakers), then utterances within each (Bisani & Ney 2004)."""
    return paired_bootstrap(errors_a, errors_b, words, blocks=blocks, **options)


# A resampling plan is the matrix of how often each utterance is drawn in each resample
# ([resamples, utterances], float32: exact for counts and sums below 2**24). It depends only
# on the sizes, the blocks and the seed, so it is kept (a few MB each) for the next
# comparison with the same layout: the gate calibration simulates thousands of those.


@functools.lru_cache(maxsize=48)
def _utterance_plan(n: int, n_resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    return _plan_counts(np.arange(n_resamples)[:, None] * n + idx, n_resamples, n)


@functools.lru_cache(maxsize=48)
def _block_plan(codes: bytes, n_resamples: int, seed: int) -> np.ndarray:
    code = np.frombuffer(codes, dtype=np.int64)
    n, n_blocks = len(code), int(code.max()) + 1
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_blocks, size=(n_resamples, n_blocks))
    times = np.bincount((np.arange(n_resamples)[:, None] * n_blocks + drawn).ravel(),
                        minlength=n_resamples * n_blocks).reshape(n_resamples, n_blocks)
    rows = np.arange(n_resamples) * n
    flat = []
    for k in range(n_blocks):  # a block drawn c times: c * n_k draws from its own utterances
        members = np.flatnonzero(code == k)
        draws = times[:, k] * len(members)
        flat.append(np.repeat(rows, draws) + members[rng.integers(0, len(members), size=int(draws.sum()))])
    return _plan_counts(np.concatenate(flat), n_resamples, n)


def _plan_counts(flat_index: np.ndarray, n_resamples: int, n: int) -> np.ndarray:
    counts = np.bincount(np.ravel(flat_index), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float32)
    counts.flags.writeable = False
    return counts


def _resampled_deltas(plan: np.ndarray, ea: np.ndarray, eb: np.ndarray, w: np.ndarray) -> np.ndarray:
    # three matrix-vector products: BLAS is far faster at these than at one [n, 3] product
    sa, sb, sw = (plan @ x.astype(np.float32) for x in (ea, eb, w))
    return _ratio_delta(sa.astype(np.float64), sb.astype(np.float64), sw.astype(np.float64))


def _ratio_delta(sum_a: np.ndarray, sum_b: np.ndarray, sum_w: np.ndarray) -> np.ndarray:
    """(a - b) / words per resample; NaN where a resample drew no words."""
    sum_w = np.asarray(sum_w, dtype=np.float64).copy()
    sum_w[sum_w == 0] = np.nan
    return (sum_a - sum_b) / sum_w


def _boot_result(ea: np.ndarray, eb: np.ndarray, w: np.ndarray, deltas: np.ndarray, confidence: float, *,
                 method: str, n_blocks: int) -> dict[str, Any]:
    lo, hi = interval(deltas, confidence)
    return {
        "delta": float((ea.sum() - eb.sum()) / w.sum()) if w.sum() else math.nan,
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "n_resamples": len(deltas),
        "method": method,
        "n_blocks": n_blocks,
        "se": standard_error(deltas),
        "samples": deltas,
    }


def interval(samples: Sequence[float] | np.ndarray, confidence: float) -> tuple[float, float]:
    """The two-sided percentile interval of bootstrap samples (NaN samples ignored; all NaN: NaN)."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(x, [alpha, 1 - alpha])
    return float(lo), float(hi)


def standard_error(samples: Sequence[float] | np.ndarray) -> float:
    """The spread (standard deviation) of bootstrap samples; NaN with fewer than 2 finite ones."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1)) if x.size > 1 else math.nan


def share_at_or_below(samples: Sequence[float] | np.ndarray, value: float = 0.0) -> float:
    """The share of finite bootstrap samples <= ``value``: the one-sided p-value of "ΔWER > value"."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float((x <= value).mean()) if x.size else math.nan


def holm_alphas(p_values: Sequence[float], alpha: float) -> list[float]:
    """Holm's per-test levels: the test of rank i (1-based, by ascending p) is tested at alpha / (m - i + 1).

    Returned in the input order. Ties keep the input order; NaN p-values rank last.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: (not math.isfinite(p_values[i]), p_values[i] if math.isfinite(p_values[i]) else 0, i))
    levels = [math.nan] * m
    for rank, i in enumerate(order):
        levels[i] = alpha / (m - rank)
    return levels


def z_quantile(p: float) -> float:
    """The standard normal quantile at ``p``."""
    return NormalDist().inv_cdf(p)


def minimum_detectable_effect(se: float, n_words: int, *, alpha: float, power: float, margin: float = 0.0,
                              rule: str = "and") -> float:
    """The true change of WER a rule on the estimate and its (1 - alpha) interval detects with probability ``power``.

    With z_a = z_{1-alpha/2}, z_b = z_{power} and SE the standard error, the rule fires when the
    estimate exceeds a threshold t: ``rule="and"``: estimate > margin AND lower bound > 0,
    t = max(margin, z_a SE); ``"or"``: estimate > margin OR lower bound > 0, t = min(margin, z_a SE);
    ``"shift"``: the bound itself must clear the margin (upper bound <= -margin for an improvement),
    t = margin + z_a SE. MDE = t + z_b SE, where SE^2 = se^2 + MDE (1 - MDE) / n_words: the bootstrap
    spread of the comparison plus the binomial noise of the changed errors (each reference word
    gains or loses an error with probability MDE). Solved by fixed-point iteration; NaN when ``se``
    is unknown, capped at 1.
    """
    if not math.isfinite(se) or n_words <= 0:
        return math.nan
    z_a, z_b = z_quantile(1 - alpha / 2), z_quantile(power)
    threshold = {"and": lambda s: max(margin, z_a * s), "or": lambda s: min(margin, z_a * s),
                 "shift": lambda s: margin + z_a * s}[rule]
    mde = 0.0
    for _ in range(100):
        p = min(mde, 0.5)
        s = math.sqrt(se**2 + p * (1 - p) / n_words)
        nxt = min(1.0, threshold(s) + z_b * s)
        if abs(nxt - mde) < 1e-7:
            break
        mde = nxt
    return nxt


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def format_pct(x: Any) -> str:
    """A rate as a percentage, ``12.34%``; ``n/a`` when it is missing or not finite."""
    return f"{100 * x:.2f}%" if _finite(x) else "n/a"


def format_points(x: Any) -> str:
    """A difference of rates in percentage points, ``+1.23 pts``; ``n/a`` when missing."""
    return f"{100 * x:+.2f} pts" if _finite(x) else "n/a"
