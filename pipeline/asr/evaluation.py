"""Evaluation: greedy CTC decoding of an exported model over a manifest, scored with jiwer.

WER and CER are jiwer's, over transcripts passed through the shared normalizer. Results
carry per-utterance error counts so gating can run a paired bootstrap (resampling
utterances) on the difference between two models scored on the same manifest.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jiwer
import numpy as np

from pipeline.data.audio import decode_audio, to_mono_resampled
from pipeline.asr.export import ExportedModel, load_exported
from pipeline.data.manifest import Utterance, read_manifest, resolve_audio_key
from pipeline.config import MlflowConfig, StorageConfig
from pipeline.storage import ObjectStore, open_store
from pipeline.data.text import normalize_text


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
        w = jiwer.process_words(ref_n, hyp_n)
        c = jiwer.process_characters(ref_n, hyp_n)
        out.append(
            (
                w.substitutions + w.deletions + w.insertions,
                w.substitutions + w.deletions + w.hits,
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


def open_manifest(
    ref: str, store: ObjectStore | None = None, storage_config: StorageConfig | None = None
) -> tuple[ObjectStore, str]:
    """A manifest given as a local path, ``file://``/``s3://`` URI, or a key of ``store``."""
    if ref.startswith("s3://") or ref.startswith("file://"):
        head, _, name = ref.rpartition("/")
        return open_store(head, storage_config), name
    if os.path.exists(ref):
        path = os.path.abspath(ref)
        return open_store(os.path.dirname(path)), os.path.basename(path)
    if store is not None and store.exists(ref):
        return store, ref
    raise FileNotFoundError(f"manifest not found: {ref} (a local path, an s3:// or file:// URI, or a key under the store root)")


def load_waveform(store: ObjectStore, key: str, sample_rate: int) -> np.ndarray:
    wave, sr = decode_audio(store.get_bytes(key))
    return to_mono_resampled(wave, sr, sample_rate).numpy()


def evaluate_model(
    model: ExportedModel,
    store: ObjectStore,
    manifest_key: str,
    *,
    batch_size: int = 16,
    limit: int | None = None,
) -> EvalResult:
    """Transcribe every utterance of the manifest and score it; RTF counts model time only."""
    utts: list[Utterance] = read_manifest(store, manifest_key)[:limit]
    sr = model.sample_rate
    scores: list[UttScore] = []
    audio_s = compute_s = 0.0
    order = sorted(range(len(utts)), key=lambda i: utts[i].duration)  # similar lengths batch together
    hyps: dict[int, str] = {}
    finite: dict[int, bool] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        waves = [load_waveform(store, resolve_audio_key(manifest_key, utts[i].audio_filepath), sr) for i in idx]
        audio_s += sum(len(w) for w in waves) / sr
        t0 = time.perf_counter()
        texts, ok = model.transcribe_checked(waves)
        compute_s += time.perf_counter() - t0
        hyps.update(zip(idx, texts))
        finite.update(zip(idx, ok))
    refs = [u.text for u in utts]
    hyp_list = [hyps[i] for i in range(len(utts))]
    for i, (u, h, (e, w, ce, cw)) in enumerate(zip(utts, hyp_list, score_pairs(refs, hyp_list))):
        scores.append(UttScore(u.utt_id, u.speaker, u.group, normalize_text(u.text), normalize_text(h), e, w, ce, cw,
                               finite[i]))  # fmt: skip
    return EvalResult(scores, audio_s, compute_s, meta=dict(model.meta))


def evaluate(
    model_ref: str,
    manifest_ref: str,
    store: ObjectStore | None = None,
    *,
    batch_size: int = 16,
    storage_config: StorageConfig | None = None,
    mlflow_config: MlflowConfig | None = None,
) -> dict[str, Any]:
    """``asr-retune evaluate``: WER/CER/per-group/RTF of an exported model (a file or a
    ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` registry URI) on a manifest."""
    path = model_ref
    if model_ref.startswith("models:/"):
        from pipeline.stages.register import resolve_model_uri

        path = str(resolve_model_uri(model_ref, mlflow_config or MlflowConfig()))
    model = load_exported(path)
    mstore, key = open_manifest(manifest_ref, store, storage_config)
    result = evaluate_model(model, mstore, key, batch_size=batch_size)
    return {"model": str(model_ref), "manifest": mstore.uri(key), **result.summary()}


def transcribe_files(model_ref: str, files: Sequence[str]) -> dict[str, Any]:
    """``asr-retune transcribe``: one transcript per audio file, in order."""
    model = load_exported(model_ref)
    out = []
    for path in files:
        with open(path, "rb") as f:
            wave, sr = decode_audio(f.read())
        text = model.transcribe([to_mono_resampled(wave, sr, model.sample_rate).numpy()])[0]
        out.append({"file": path, "text": text, "duration_s": round(wave.shape[1] / sr, 3)})
    return {"model": str(model_ref), "transcripts": out}
