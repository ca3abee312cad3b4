"""Feature extraction: the log-mel features of the training pool for one front end.

:func:`extract_pool_features` is the one extraction, run by the ``features`` stage for the
configured front end, and by the ``search`` and ``train`` stages for the front ends a
trial or the winner chose (``n_mels``/``win_ms``/``hop_ms``). It computes only audio whose
sha256 is in no shard of that front end's cache yet (:mod:`pipeline.data.features`),
writes it into NEW shards, reuses old shards as they are, and writes the run's index.
The configured front end is the run's partition ``features``; any other is
``features-{hash[:12]}`` (:func:`name_features_stage`), so several live in one run.

**Parallelism.** ``features.workers`` threads (0 = one per core) each fetch, decode
(soundfile; 16-bit PCM is read raw and scaled like libsndfile does) and compute whole
chunks of ~100 utterances with :class:`pipeline.asr.frontend.LogMelComputer`; torch kernels
and libsndfile release the GIL. Torch's own intra-op threads are set to 1 while it runs
(restored afterwards) so the two levels do not oversubscribe. Chunks are consumed in
order and a full shard is written by one background thread while the next is computed.
Threads, not processes: no torch import per worker, and the same code hides S3 latency.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from pipeline.asr.augment import Draw, augment_hash, augment_wave, copy_key, draw
from pipeline.asr.frontend import FrontEnd, LogMelComputer
from pipeline.config import AugmentConfig, FeatureConfig
from pipeline.data.audio import resample
from pipeline.data.features import (
    FEATURES_STAGE,
    STORAGE_DTYPE,
    CacheEntry,
    FeatureCache,
    combine_stats,
    summarize_frames,
)
from pipeline.data.pool import Pool, read_pool
from pipeline.run import RunContext
from pipeline.storage import ObjectStore

_CHUNK_SAMPLES = 1 << 19  # ~65 s at 8 kHz per batched STFT
_CHUNK_UTTERANCES = 128


@dataclass
class _Job:
    sha256: str  # the cache key: the audio's sha256, or an augmented copy's (augment.copy_key)
    audio_key: str
    utt_id: str
    draw: Draw | None = None  # an augmented copy: what it gets


@dataclass
class _ChunkResult:
    shas: list[str]
    samples: list[int]
    feats: np.ndarray
    frames: np.ndarray
    stats: np.ndarray
    resampled: int


def resolve_frontend(ctx: RunContext, frontend: FeatureConfig | None = None) -> tuple[FrontEnd, FeatureConfig]:
    """The front end a call uses (default: the run's configuration) and its FeatureConfig."""
    config = frontend or ctx.config.features
    return FrontEnd.from_config(config, ctx.config.audio.sample_rate), config


def name_features_stage(ctx: RunContext, frontend: FeatureConfig | None = None) -> str:
    """``features`` for the configured front end, ``features-{hash12}`` for another one."""
    fe, _ = resolve_frontend(ctx, frontend)
    configured, _ = resolve_frontend(ctx, None)
    return FEATURES_STAGE if fe.hash == configured.hash else f"{FEATURES_STAGE}-{fe.hash[:12]}"


def resolve_workers(workers: int) -> int:
    """``workers``, or for 0 the cores this process may run on (its CPU affinity)."""
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- computing shards


def _decode(data: bytes, utt_id: str, sample_rate: int) -> tuple[np.ndarray, bool]:
    """float32 mono samples at ``sample_rate`` (and whether they had to be resampled)."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.channels != 1:
                raise ValueError(
                    f"audio of utterance {utt_id!r} has {f.channels} channels; the pool must be mono (re-run ingest)"
                )
            sr = f.samplerate
            if f.subtype == "PCM_16":  # the pool's format: read raw, scale like libsndfile (x / 2**15), faster
                wave = f.read(dtype="int16").astype(np.float32) * np.float32(1.0 / 32768)
            else:
                wave = f.read(dtype="float32")
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"cannot decode audio of utterance {utt_id!r}: {exc}") from None
    if sr == sample_rate:
        return wave, False
    return resample(wave, sr, sample_rate), True


def _chunk_jobs(jobs: list[_Job], samples_hint: dict[str, int]) -> list[list[_Job]]:
    chunks: list[list[_Job]] = []
    current: list[_Job] = []
    size = 0
    for job in jobs:
        current.append(job)
        size += samples_hint.get(job.sha256, 0)
        if len(current) >= _CHUNK_UTTERANCES or size >= _CHUNK_SAMPLES:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


def _compute_chunk(store: ObjectStore, computer: LogMelComputer, chunk: list[_Job]) -> _ChunkResult:
    waves: list[np.ndarray] = []
    resampled = 0
    for job in chunk:
        wave, changed = _decode(store.get_bytes(job.audio_key), job.utt_id, computer.frontend.sample_rate)
        if job.draw is not None:
            wave = augment_wave(wave, computer.frontend.sample_rate, job.draw)
        if wave.shape[0] <= computer.n_fft // 2:
            raise ValueError(
                f"utterance {job.utt_id!r} has {wave.shape[0]} samples, too short for a {computer.n_fft}-point "
                "window; ingest's min_duration_s should have rejected it"
            )
        waves.append(wave)
        resampled += changed
    feats, frames = computer.compute(waves)
    return _ChunkResult(
        shas=[j.sha256 for j in chunk],
        samples=[w.shape[0] for w in waves],
        feats=feats,
        frames=frames,
        stats=summarize_frames(feats, frames),
        resampled=resampled,
    )


class _ShardWriter:
    """Collects computed chunks; every ``shard_utterances`` utterances, writes a shard.

    Writes run on one background thread, so computing the next shard overlaps uploading
    the last one; at most one write is in flight (bounded memory), and :meth:`close`
    waits for the last and re-raises any write error.
    """

    def __init__(self, cache: FeatureCache, shard_utterances: int, run_id: str):
        self.cache, self.limit, self.run_id = cache, shard_utterances, run_id
        self.parts: list[_ChunkResult] = []
        self.count = 0
        self.new_shards: list[str] = []
        self._io = cf.ThreadPoolExecutor(1, thread_name_prefix="features-write")
        self._inflight: cf.Future[dict[str, Any]] | None = None

    def add(self, part: _ChunkResult) -> None:
        self.parts.append(part)
        self.count += len(part.shas)
        while self.count >= self.limit:
            self._flush(self.limit)

    def close(self) -> None:
        try:
            if self.count:
                self._flush(self.count)
            self._wait()
        finally:
            self._io.shutdown(wait=True)

    def abort(self) -> None:
        """Drop what is not written yet; let a write in flight finish (shards are complete or absent)."""
        with contextlib.suppress(Exception):
            if self._inflight is not None:
                self._inflight.result()
        self._io.shutdown(wait=True)

    def _wait(self) -> None:
        if self._inflight is not None:
            self.new_shards.append(self._inflight.result()["shard"])
            self._inflight = None

    def _flush(self, n: int) -> None:
        shas: list[str] = [s for p in self.parts for s in p.shas]
        samples = [s for p in self.parts for s in p.samples]
        frames = np.concatenate([p.frames for p in self.parts])
        feats = np.concatenate([p.feats for p in self.parts]) if len(self.parts) > 1 else self.parts[0].feats
        stats = np.concatenate([p.stats for p in self.parts])
        cut = int(frames[:n].sum())
        self._wait()
        self._inflight = self._io.submit(
            self.cache.write_shard, shas[:n], samples[:n], feats[:cut], frames[:n], stats[:n], self.run_id
        )
        rest = _ChunkResult(shas[n:], samples[n:], feats[cut:], frames[n:], stats[n:], 0)
        self.parts = [rest] if rest.shas else []
        self.count = len(rest.shas)


def compute_missing_features(
    store: ObjectStore,
    cache: FeatureCache,
    frontend: FrontEnd,
    jobs: list[_Job],
    *,
    shard_utterances: int,
    workers: int,
    run_id: str,
    progress: bool = True,
    samples_hint: dict[str, int] | None = None,
) -> tuple[list[str], int]:
    """Compute ``jobs`` (audio not in ``cache``) into new shards; returns (new shard ids, resampled count)."""
    computer = LogMelComputer(frontend)
    writer = _ShardWriter(cache, shard_utterances, run_id)
    chunks = _chunk_jobs(jobs, samples_hint or {})
    resampled = 0
    with (
        _torch_threads(1),
        cf.ThreadPoolExecutor(workers, thread_name_prefix="features") as pool,
        tqdm(total=len(jobs), desc="features", unit="utt", file=sys.stderr, disable=not progress) as bar,
    ):
        pending: list[cf.Future[_ChunkResult]] = []
        it = iter(chunks)
        for chunk in it:  # keep a bounded window of chunks in flight, consume them in order
            pending.append(pool.submit(_compute_chunk, store, computer, chunk))
            if len(pending) >= 2 * workers:
                break
        try:
            while pending:
                part = pending.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(_compute_chunk, store, computer, nxt))
                writer.add(part)
                resampled += part.resampled
                bar.update(len(part.shas))
        except BaseException:
            for future in pending:
                future.cancel()
            writer.abort()
            raise
        writer.close()
    return writer.new_shards, resampled


# --------------------------------------------------------------------------- a run's features


def extract_pool_features(
    ctx: RunContext, frontend: FeatureConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """The features of the run's current pool for ``frontend`` (default ``config.features``),
    as the run-scoped transaction :func:`name_features_stage` names (skipped when complete).

    Returns the summary stored in the partition's ``_SUCCESS``.
    """
    fe, feature_config = resolve_frontend(ctx, frontend)
    stage = name_features_stage(ctx, frontend)
    return ctx.run_stage(stage, lambda: _extract(ctx, stage, fe, feature_config, progress))


def _extract(
    ctx: RunContext, stage: str, fe: FrontEnd, feature_config: FeatureConfig, progress: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    store = ctx.store
    pool: Pool = read_pool(store)
    workers = resolve_workers(feature_config.workers)
    cache = FeatureCache.open(store, fe.hash, fe.settings, fe.n_mels, workers=workers)
    shards_before = len(cache.shards)
    augment = ctx.config.augment
    jobs, samples_hint = _plan_jobs(store, pool, cache, fe.sample_rate, augment)

    compute_started = time.perf_counter()
    new_shards, resampled = compute_missing_features(
        store, cache, fe, jobs, shard_utterances=feature_config.shard_utterances, workers=workers,
        run_id=ctx.run_id, progress=progress, samples_hint=samples_hint,
    )
    compute_s = time.perf_counter() - compute_started

    entries = [cache.entries[utt.sha256] for utt in pool.utterances]
    copies = [[cache.entries[copy_key(utt.sha256, augment, k)] for k in range(1, augment.copies + 1)]
              for utt in pool.utterances]
    utterances = _index_rows(pool, entries, copies)
    stats = _pool_stats(store, cache, pool, entries)
    index_key, stats_key = _write_index(ctx, stage, fe, cache, pool, utterances, stats)

    computed = sum(1 for job in jobs if job.draw is None)
    queued = {job.sha256 for job in jobs}
    return {
        "augmented_copies": augment.copies,
        "augment_hash": augment_hash(augment) if augment.copies else None,
        "copies_computed": len(jobs) - computed,
        "pool_version": pool.version,
        "frontend_hash": fe.hash,
        "cache_prefix": cache.prefix,
        "index_uri": store.uri(index_key),
        "stats_uri": store.uri(stats_key),
        "utterances": len(utterances),
        "computed": computed,
        "reused": sum(1 for u in utterances if u["sha256"] not in queued),
        "resampled": resampled,
        "new_shards": len(new_shards),
        "shards": len({u["shard"] for u in utterances}),
        "shards_before": shards_before,
        "frames": stats["frames"],
        "audio_seconds": round(float(sum(u["duration"] for u in utterances)), 3),
        "workers": workers,
        "compute_seconds": round(compute_s, 3),
        "elapsed_seconds": round(time.perf_counter() - started, 3),
        "computed_utts_per_s": round(computed / compute_s, 1) if computed and compute_s > 0 else None,
    }


def _plan_jobs(
    store: ObjectStore, pool: Pool, cache: FeatureCache, sample_rate: int, augment: AugmentConfig
) -> tuple[list[_Job], dict[str, int]]:
    """The pool's audio (and augmented copies) that no shard holds yet, each key once, and
    their expected sample counts."""
    jobs: list[_Job] = []
    samples_hint: dict[str, int] = {}
    for utt in pool.utterances:
        keys = [(utt.sha256, None)] + [(copy_key(utt.sha256, augment, k), draw(augment, utt.sha256, k))
                                       for k in range(1, augment.copies + 1)]
        for key, d in keys:
            if key in cache.entries or key in samples_hint:
                continue
            jobs.append(_Job(sha256=key, audio_key=pool.audio_key(utt, store), utt_id=utt.utt_id, draw=d))
            samples_hint[key] = int(utt.duration * sample_rate / (d.speed if d else 1.0))
    return jobs, samples_hint


def _index_rows(pool: Pool, entries: list[CacheEntry], copies: list[list[CacheEntry]]) -> list[dict[str, Any]]:
    """The index's row of every pool utterance: where its features (and copies) are, and its transcript."""
    rows = [
        {
            "utt_id": utt.utt_id,
            "sha256": utt.sha256,
            "shard": entry.shard,
            "offset": entry.offset,
            "frames": entry.frames,
            "text": utt.text,
            "speaker": utt.speaker,
            "group": utt.group,
            "duration": utt.duration,
        }
        for utt, entry in zip(pool.utterances, entries, strict=True)
    ]
    for row, extra in zip(rows, copies, strict=True):
        if extra:
            row["copies"] = [{"shard": e.shard, "offset": e.offset, "frames": e.frames} for e in extra]
    return rows


def _pool_stats(store: ObjectStore, cache: FeatureCache, pool: Pool, entries: list[CacheEntry]) -> dict[str, Any]:
    """Per-mel-bin mean and variance over every frame of the pool, from the shards' stats rows."""
    shard_stats = {s: cache.read_stats(s) for s in sorted({e.shard for e in entries})}
    frames = np.array([e.frames for e in entries], dtype=np.int64)
    per_utt = np.stack([shard_stats[e.shard][e.row] for e in entries])
    mean, var = combine_stats(frames, per_utt)
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        raise RuntimeError(f"non-finite feature statistics over pool {pool.version!r}: a cached shard is corrupt; "
                           f"delete {store.uri(cache.prefix)} to rebuild it")
    return {"frames": int(frames.sum()), "mean": mean.tolist(), "var": var.tolist()}


def _write_index(
    ctx: RunContext, stage: str, fe: FrontEnd, cache: FeatureCache, pool: Pool,
    utterances: list[dict[str, Any]], stats: dict[str, Any],
) -> tuple[str, str]:
    """Write the partition's ``stats.json`` and ``index.json``; return their keys."""
    index = {
        "frontend": fe.settings,
        "storage": fe.storage,
        "frontend_hash": fe.hash,
        "cache_prefix": cache.prefix,
        "pool_version": pool.version,
        "n_mels": fe.n_mels,
        "dtype": np.dtype(STORAGE_DTYPE).name,
        "shards": sorted({u["shard"] for u in utterances}),
        "stats": stats,
        "utterances": utterances,
    }
    index_key = ctx.stage_key(stage, "index.json")
    stats_key = ctx.stage_key(stage, "stats.json")
    ctx.store.put_text(stats_key, json.dumps({"frontend_hash": fe.hash, "pool_version": pool.version, **stats}))
    ctx.store.put_text(index_key, json.dumps(index, separators=(",", ":")))
    return index_key, stats_key
