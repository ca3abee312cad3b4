"""Scoring: WER and CER with jiwer over the shared normalizer, per utterance and per group.

One definition of "an error" for evaluation, training's dev WER and the canary:
substitutions + deletions + insertions against the normalized reference, counted by
jiwer. :func:`score_pairs` refuses an empty reference (a golden or dev utterance must say
something); :func:`word_errors` scores it as nothing to get wrong (a canary request may
carry no reference text).
"""

from __future__ import annotations

import math
from collections import defaultdict
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
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """CI of WER(a) - WER(b), resampling utterances with replacement (paired: same draws for both)."""
    ea, eb, w = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, words))
    if not (len(ea) == len(eb) == len(w)) or len(w) == 0:
        raise ValueError("paired bootstrap needs equally long, non-empty per-utterance arrays")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(w), size=(n_resamples, len(w)))
    tw = w[idx].sum(axis=1)
    tw[tw == 0] = np.nan
    deltas = (ea[idx].sum(axis=1) - eb[idx].sum(axis=1)) / tw
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(deltas, [alpha, 1 - alpha])
    return {
        "delta": float((ea.sum() - eb.sum()) / w.sum()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "samples": deltas,
    }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def format_pct(x: Any) -> str:
    """A rate as a percentage, ``12.34%``; ``n/a`` when it is missing or not finite."""
    return f"{100 * x:.2f}%" if _finite(x) else "n/a"


def format_points(x: Any) -> str:
    """A difference of rates in percentage points, ``+1.23 pts``; ``n/a`` when missing."""
    return f"{100 * x:+.2f} pts" if _finite(x) else "n/a"
