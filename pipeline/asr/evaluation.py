"""Evaluation: greedy CTC decoding of an exported model over a manifest.

Scoring (WER/CER per utterance, per group, the paired bootstrap) is
:mod:`pipeline.asr.metrics`; results carry per-utterance error counts so gating can
compare two models scored on the same manifest. A model is given as a local file, a key
of the store (:func:`fetch_model`) or a ``models:/`` registry URI (:func:`evaluate`,
resolved by :mod:`pipeline.tracking`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.asr.export import ExportedModel, load_exported
from pipeline.asr.metrics import EvalResult, UttScore, score_pairs
from pipeline.config import MlflowConfig, StorageConfig
from pipeline.data.audio import decode_audio, to_mono_resampled
from pipeline.data.manifest import Utterance, read_manifest, resolve_audio_key
from pipeline.data.text import normalize_text
from pipeline.storage import ObjectStore, open_store
from pipeline.tracking import resolve_model_uri


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


def fetch_model(store: ObjectStore, ref: str, dest: str | os.PathLike) -> None:
    """Copy a model file given as a local path, or else as a key of ``store``, to ``dest``."""
    if os.path.isfile(ref):
        shutil.copyfile(ref, dest)
    else:
        store.download_file(ref, dest)


def model_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata an exported model file carries (what :mod:`pipeline.tracking` logs as params)."""
    return load_exported(path).meta


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
