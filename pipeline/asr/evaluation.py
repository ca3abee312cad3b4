"""Evaluation: greedy CTC decoding of an exported model over a manifest, and transcription.

Scoring (WER/CER per utterance, per group, the paired bootstrap) is
:mod:`pipeline.asr.metrics`; results carry per-utterance error counts so gating can
compare two models scored on the same manifest. Manifests are read as NeMo writes them
(:class:`~pipeline.data.manifest.NemoManifest`). :func:`load_model` is the one way a model
reference is resolved (``evaluate`` and ``transcribe`` both use it): a ``models:/`` registry
URI (through :mod:`pipeline.tracking`), a local file, a ``file://``/``s3://`` URI, or a key of
the store such as a run's ``runs/RUN_ID/train/model.pt``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from pipeline.asr.export import ExportedModel, load_exported
from pipeline.asr.metrics import EvalResult, UttScore, score_pairs
from pipeline.config import MlflowConfig, StorageConfig
from pipeline.data.audio import decode_audio, to_mono_resampled
from pipeline.data.manifest import NemoManifest, Utterance
from pipeline.data.text import normalize_text
from pipeline.progress import Progress
from pipeline.storage import ObjectStore, StorageError, open_store
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


def load_model(
    ref: str,
    store: ObjectStore | None = None,
    *,
    storage_config: StorageConfig | None = None,
    mlflow_config: MlflowConfig | None = None,
) -> ExportedModel:
    """The exported model ``ref`` names: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (the
    registry), a local file, a ``file://``/``s3://`` URI, or a key of ``store`` such as a run's
    ``runs/RUN_ID/train/model.pt`` (a local file wins over a key of the same name)."""
    if ref.startswith("models:/"):
        return load_exported(resolve_model_uri(ref, mlflow_config or MlflowConfig()))
    if os.path.isfile(ref):
        return load_exported(ref)
    if ref.startswith("file://") and os.path.isfile(unquote(urlsplit(ref).path)):
        return load_exported(unquote(urlsplit(ref).path))
    source: tuple[ObjectStore, str] | None = None
    if ref.startswith(("s3://", "file://")):
        head, _, name = ref.rpartition("/")
        source = open_store(head, storage_config), name
    elif store is not None and _is_key_of(store, ref):
        source = store, ref
    if source is None or not source[0].exists(source[1]):
        raise FileNotFoundError(
            f"model not found: {ref} (give a registry URI models:/NAME@ALIAS or models:/NAME/VERSION, a model "
            "file, a file:// or s3:// URI, or a key under the store root such as runs/RUN_ID/train/model.pt)"
        )
    with tempfile.TemporaryDirectory() as tmp:  # the model is read into memory whole
        local = Path(tmp) / "model.pt"
        source[0].download_file(source[1], local)
        return load_exported(local)


def _is_key_of(store: ObjectStore, ref: str) -> bool:
    try:
        return store.exists(ref)
    except StorageError:  # not a valid key (absolute, '..')
        return False


def model_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata an exported model file carries (what :mod:`pipeline.tracking` logs as params)."""
    return load_exported(path).meta


def load_waveform(manifest: NemoManifest, audio_filepath: str, sample_rate: int) -> np.ndarray:
    wave, sr = decode_audio(manifest.audio_bytes(audio_filepath))
    return to_mono_resampled(wave, sr, sample_rate).numpy()


def evaluate_model(
    model: ExportedModel,
    store: ObjectStore,
    manifest_key: str,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    storage_config: StorageConfig | None = None,
    progress: str | None = None,
) -> EvalResult:
    """Transcribe every utterance of the manifest and score it; RTF counts model time only.

    ``storage_config`` is used to open S3 buckets the manifest names that ``store`` is not in.
    ``progress`` names the step for :class:`pipeline.progress.Progress` (its file only; no bar).
    """
    manifest = NemoManifest(store, manifest_key, storage_config)
    utts: list[Utterance] = manifest.utterances()[:limit]
    sr = model.sample_rate
    scores: list[UttScore] = []
    audio_s = compute_s = 0.0
    order = sorted(range(len(utts)), key=lambda i: utts[i].duration)  # similar lengths batch together
    hyps: dict[int, str] = {}
    finite: dict[int, bool] = {}
    bar = Progress(progress, len(utts), "utt", enabled=False, path="env" if progress else None)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        waves = [load_waveform(manifest, utts[i].audio_filepath, sr) for i in idx]
        audio_s += sum(len(w) for w in waves) / sr
        t0 = time.perf_counter()
        texts, ok = model.transcribe_checked(waves)
        compute_s += time.perf_counter() - t0
        hyps.update(zip(idx, texts))
        finite.update(zip(idx, ok))
        bar.update(len(idx))
    bar.close()
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
    """``asr-retune evaluate``: WER/CER/per-group/RTF of a model (:func:`load_model`) on a manifest."""
    model = load_model(model_ref, store, storage_config=storage_config, mlflow_config=mlflow_config)
    mstore, key = open_manifest(manifest_ref, store, storage_config)
    result = evaluate_model(model, mstore, key, batch_size=batch_size, storage_config=storage_config)
    return {"model": str(model_ref), "manifest": mstore.uri(key), **result.summary()}


def transcribe_files(
    model_ref: str,
    files: Sequence[str],
    store: ObjectStore | None = None,
    *,
    storage_config: StorageConfig | None = None,
    mlflow_config: MlflowConfig | None = None,
) -> dict[str, Any]:
    """``asr-retune transcribe``: one transcript per audio file, in order, by a model (:func:`load_model`)."""
    model = load_model(model_ref, store, storage_config=storage_config, mlflow_config=mlflow_config)
    out = []
    for path in files:
        with open(path, "rb") as f:
            wave, sr = decode_audio(f.read())
        text = model.transcribe([to_mono_resampled(wave, sr, model.sample_rate).numpy()])[0]
        out.append({"file": path, "text": text, "duration_s": round(wave.shape[1] / sr, 3)})
    return {"model": str(model_ref), "transcripts": out}
