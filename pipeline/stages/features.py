"""Log-mel features for the training pool, with a content-addressed cache.

**Front end.** One definition, :mod:`pipeline.asr.frontend` (``LogMel``), shared with training
and the exported model: torchaudio ``MelSpectrogram`` with ``win_length``/``hop_length`` =
``win_ms``/``hop_ms`` at ``config.audio.sample_rate`` (25 ms / 10 ms at 8 kHz -> 200 / 80
samples), ``n_fft`` the next power of two >= ``win_length``, periodic Hann window,
``center=True`` with reflect padding, power 2, HTK mel scale from 0 Hz to Nyquist, no
filter normalization; then ``ln(mel + 1e-6)``. An utterance of ``n`` samples has
``1 + n // hop_length`` frames. A fixed log floor rather than ``AmplitudeToDB(top_db=…)``:
``top_db`` clamps relative to the loudest value of whatever tensor it is given, so an
utterance's features would depend on how it was batched; the floor is per element.
Features are stored as float16 (half the bytes; the rounding, at most ~0.008 for values
below 16, is far under the spread of log-mels); every statistic below is computed from
the stored float16 values, i.e. from what a loader reads.

**Batched, exact.** Each utterance is reflect-padded on its own, the padded signals are
laid end to end on hop-aligned offsets, and one ``torch.stft(center=False)`` covers a
chunk of ~100 utterances; frames straddling two utterances are dropped. Every kept frame
sees exactly the samples ``MelSpectrogram`` gives it, so the features equal the
per-utterance transform up to float rounding (the tests compare them), without its
per-call overhead. Window, filterbank and sizes are read off ``LogMel`` itself.

**Parallelism.** ``features.workers`` threads (0 = one per core) each fetch, decode
(soundfile; 16-bit PCM is read raw and scaled like libsndfile does) and compute whole
chunks; torch kernels and libsndfile release the GIL. Torch's own intra-op threads are set
to 1 while the stage runs (restored afterwards) so the two levels do not oversubscribe.
Chunks are consumed in order and a full shard is written by one background thread
while the next is computed. Threads, not processes: no torch import per worker, and the
same code hides S3 latency.

**Cache.** Features outlive runs: ``state/features/{frontend_hash}/``, where the hash covers
the front-end settings (sample rate, n_mels, window, hop, n_fft, log floor) and the
storage format (dtype, format version), but not ``shard_utterances`` or ``workers``::

    frontend.json                 the settings and storage format the hash was made from
    shards/{shard}.npy            float16 [frames, n_mels]: its utterances end to end
    shards/{shard}.stats.npy      float64 [utterances, 2, n_mels]: per-utterance mean and M2
    shards/{shard}.json           {"utterances": [{"sha256", "offset", "frames", "samples"}], ...}

An utterance's key is (audio sha256, frontend hash). A shard is immutable; its id is a
hash of its members' sha256s and its ``.json`` is written last, so a shard without one
is an interrupted write and is ignored (and a retry rewrites it under the same id). A
weekly run computes only audio whose sha256 is in no shard yet and writes it into NEW
shards; old shards are reused as they are, and the pool statistics are combined from the
per-utterance ``.stats.npy`` rows (Chan et al.), so reused features are never re-read.
Shards are plain ``.npy``: ``np.load(path, mmap_mode="r")`` maps them.

**Search trials** may change ``n_mels``/``win_ms``/``hop_ms``: one cache per front-end
setting (the hash is in the path), so ``extract_features(ctx, frontend=FeatureConfig(n_mels=64))``
builds that setting's cache once and reuses it in later trials and weeks. The run's output
for the configured front end is stage ``features`` (``runs/{run_id}/features/``); any other
front end is stage ``features-{hash[:12]}`` (:func:`name_features_stage`), so several can
live in one run.

**Run output.** ``runs/{run_id}/{stage}/index.json``: ``frontend`` (the ``LogMel``
settings), ``storage``, ``frontend_hash``, ``cache_prefix``, ``pool_version``, ``shards``,
``stats`` (per-mel-bin ``mean``/``var`` over every frame of the pool, and ``frames``) and
per utterance ``{utt_id, sha256, shard, offset, frames, text, speaker, group, duration}``;
``stats.json`` holds the statistics alone. :class:`FeatureStore` reads it for training.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from pipeline.config import FeatureConfig
from pipeline.asr.frontend import LogMel, frontend_settings, settings_hash
from pipeline.data.pool import Pool, read_pool
from pipeline.run import RunContext
from pipeline.storage import LocalStore, ObjectStore, join

FEATURES_STAGE = "features"
FORMAT_VERSION = 1
STORAGE_DTYPE = np.float16
CACHE_PREFIX = "state/features"
_CHUNK_SAMPLES = 1 << 19  # ~65 s at 8 kHz per batched STFT
_CHUNK_UTTERANCES = 128


# --------------------------------------------------------------------------- front end


class FrontEnd:
    """One log-mel front end: :mod:`pipeline.asr.frontend`'s settings plus the storage format.

    ``settings`` is exactly what :func:`pipeline.asr.frontend.frontend_settings` gives (so
    :class:`pipeline.asr.frontend.LogMel` and the exported model rebuild the same transform
    from a run's ``index.json``); :attr:`hash` also covers the storage format.
    """

    def __init__(self, settings: dict[str, Any]):
        self.settings = dict(settings)
        self.sample_rate = int(settings["sample_rate"])
        self.n_mels = int(settings["n_mels"])
        self.win_length = int(settings["win_length"])
        self.hop_length = int(settings["hop_length"])
        self.n_fft = int(settings["n_fft"])
        if self.hop_length < 1 or self.win_length < 2:
            raise ValueError(
                f"front end too fine for {self.sample_rate} Hz: window {self.win_length} and hop "
                f"{self.hop_length} samples; raise win_ms/hop_ms"
            )
        if self.n_mels > self.n_fft // 2 + 1:
            raise ValueError(
                f"n_mels={self.n_mels} exceeds the {self.n_fft // 2 + 1} FFT bins of a {self.win_length}-sample "
                f"window at {self.sample_rate} Hz; lower n_mels or raise win_ms"
            )

    @classmethod
    def from_config(cls, config: FeatureConfig, sample_rate: int) -> FrontEnd:
        return cls(frontend_settings(config, sample_rate))

    @property
    def storage(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "dtype": np.dtype(STORAGE_DTYPE).name}

    @property
    def hash(self) -> str:
        return settings_hash({**self.settings, "storage": self.storage})

    def count_frames(self, n_samples: int) -> int:
        return 1 + n_samples // self.hop_length

    def build_module(self) -> LogMel:
        """The reference per-utterance transform (waveform -> log-mel [frames, n_mels])."""
        return LogMel(self.settings)


class LogMelComputer:
    """Batched, exact log-mel features for many utterances (see the module docstring).

    Window, filterbank, FFT size, hop and log floor are read off the shared
    :class:`pipeline.asr.frontend.LogMel`, so the two cannot drift apart silently; settings
    the batching does not reproduce fail here rather than give different features.
    """

    def __init__(self, frontend: FrontEnd):
        self.frontend = frontend
        reference = frontend.build_module()
        spec, mel = reference.mel.spectrogram, reference.mel.mel_scale
        if not (spec.center and spec.pad_mode == "reflect" and spec.power == 2.0 and not spec.normalized
                and spec.pad == 0 and spec.onesided):
            raise NotImplementedError(
                "batched log-mel extraction assumes center=True, reflect padding, power 2, no normalization; "
                "pipeline.asr.frontend.LogMel changed: update LogMelComputer to match"
            )
        self.n_fft, self.win_length, self.hop_length = spec.n_fft, spec.win_length, spec.hop_length
        self.window = spec.window.detach().clone()
        self.fbank = mel.fb.detach().clone()  # [n_fft // 2 + 1, n_mels]
        self.log_floor = float(reference.log_floor)

    def compute(self, waves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Log-mels of ``waves`` (float32 mono at the front end's rate), stored dtype.

        Returns ``(features [sum(frames), n_mels], frames per utterance)``: the
        utterances' frames end to end, in order.
        """
        half, hop = self.n_fft // 2, self.hop_length
        starts: list[int] = []
        frames: list[int] = []
        pos = 0
        for w in waves:
            if w.ndim != 1 or w.shape[0] <= half:
                raise ValueError(f"need mono audio longer than {half} samples, got shape {tuple(w.shape)}")
            starts.append(pos)
            frames.append(1 + w.shape[0] // hop)
            padded = w.shape[0] + 2 * half
            pos += -(-padded // hop) * hop  # next utterance starts on a hop boundary
        buf = np.zeros(max(pos, self.n_fft), dtype=np.float32)
        for start, w in zip(starts, waves, strict=True):  # reflect-pad like torch.stft(center=True)
            n = w.shape[0]
            buf[start:start + half] = w[half:0:-1]
            buf[start + half:start + half + n] = w
            buf[start + half + n:start + 2 * half + n] = w[n - 2:n - 2 - half:-1] if n - 2 - half >= 0 else w[n - 2::-1]
        spec = torch.stft(
            torch.from_numpy(buf), self.n_fft, hop, self.win_length, self.window, center=False, return_complex=True
        )
        power = spec.real.square() + spec.imag.square()  # |X|^2 without the sqrt of abs()
        mel = torch.matmul(power.transpose(0, 1), self.fbank)  # [all frames, n_mels]
        kept = [np.arange(s // hop, s // hop + f) for s, f in zip(starts, frames, strict=True)]
        rows = torch.from_numpy(np.concatenate(kept))
        logmel = torch.log(mel.index_select(0, rows).add_(self.log_floor))
        return logmel.to(torch.float16).numpy(), np.asarray(frames, dtype=np.int64)


def compute_log_mel(wave: np.ndarray, frontend: FrontEnd) -> np.ndarray:
    """Log-mel features of one utterance, float16 [frames, n_mels]."""
    feats, _ = LogMelComputer(frontend).compute([np.asarray(wave, dtype=np.float32)])
    return feats


def summarize_frames(feats: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Per-utterance [mean, M2] (float64 [utterances, 2, n_mels]) of consecutive frame blocks."""
    x = feats.astype(np.float64)
    bounds = np.concatenate([[0], np.cumsum(frames)[:-1]])
    sums = np.add.reduceat(x, bounds, axis=0)
    sumsq = np.add.reduceat(x * x, bounds, axis=0)
    n = frames[:, None].astype(np.float64)
    mean = sums / n
    m2 = np.maximum(sumsq - sums * mean, 0.0)
    return np.stack([mean, m2], axis=1)


def combine_stats(frames: np.ndarray, per_utt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool mean and (population) variance per mel bin from per-utterance (frames, mean, M2)."""
    n = frames.astype(np.float64)[:, None]
    total = float(n.sum())
    means, m2s = per_utt[:, 0, :], per_utt[:, 1, :]
    mean = (n * means).sum(axis=0) / total
    m2 = m2s.sum(axis=0) + (n * (means - mean) ** 2).sum(axis=0)
    return mean, m2 / total


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CacheEntry:
    shard: str
    offset: int
    frames: int
    row: int  # the utterance's position inside its shard (row of the .stats.npy)


@dataclass
class FeatureCache:
    """The shards of one front end in a store: which audio (by sha256) they already hold."""

    store: ObjectStore
    frontend: FrontEnd
    entries: dict[str, CacheEntry] = field(default_factory=dict)
    shards: set[str] = field(default_factory=set)

    @property
    def prefix(self) -> str:
        return join(CACHE_PREFIX, self.frontend.hash)

    def shard_key(self, shard: str, suffix: str = ".npy") -> str:
        return join(self.prefix, "shards", shard + suffix)

    @classmethod
    def open(cls, store: ObjectStore, frontend: FrontEnd, workers: int = 8) -> FeatureCache:
        """Read every complete shard's index (its ``.json``); record the settings on first use."""
        cache = cls(store=store, frontend=frontend)
        settings_key = join(cache.prefix, "frontend.json")
        if not store.exists(settings_key):
            record = {"settings": frontend.settings, "storage": frontend.storage}
            store.put_text(settings_key, json.dumps(record, indent=2, sort_keys=True))
        index_keys = [k for k in store.list(join(cache.prefix, "shards") + "/") if k.endswith(".json")]
        with cf.ThreadPoolExecutor(max(1, workers)) as pool:
            indexes = list(pool.map(lambda k: json.loads(store.get_text(k)), index_keys))
        for index in sorted(indexes, key=lambda d: d["shard"]):  # first shard wins a duplicated sha
            cache.add_shard(index)
        return cache

    def add_shard(self, index: dict[str, Any]) -> None:
        self.shards.add(index["shard"])
        for row, u in enumerate(index["utterances"]):
            self.entries.setdefault(u["sha256"], CacheEntry(index["shard"], u["offset"], u["frames"], row))

    def write_shard(self, shas: list[str], samples: list[int], feats: np.ndarray, frames: np.ndarray,
                    stats: np.ndarray, run_id: str) -> dict[str, Any]:
        """Write one new shard (features, stats, then its index last) and register it."""
        shard = hashlib.sha256("\n".join(shas).encode()).hexdigest()[:20]
        offsets = np.concatenate([[0], np.cumsum(frames)[:-1]])
        index = {
            "shard": shard,
            "frontend_hash": self.frontend.hash,
            "n_mels": self.frontend.n_mels,
            "dtype": np.dtype(STORAGE_DTYPE).name,
            "frames": int(frames.sum()),
            "created_by_run": run_id,
            "utterances": [
                {"sha256": s, "offset": int(o), "frames": int(f), "samples": int(n)}
                for s, o, f, n in zip(shas, offsets, frames, samples, strict=True)
            ],
        }
        for suffix, array in ((".npy", feats), (".stats.npy", stats)):
            with self.store.atomic_write(self.shard_key(shard, suffix)) as out:
                np.save(out, np.ascontiguousarray(array), allow_pickle=False)
        self.store.put_text(self.shard_key(shard, ".json"), json.dumps(index, separators=(",", ":")))
        self.add_shard(index)
        return index

    def read_stats(self, shard: str) -> np.ndarray:
        with self.store.open_read(self.shard_key(shard, ".stats.npy")) as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)


# --------------------------------------------------------------------------- stage


@dataclass
class _Job:
    sha256: str
    audio_key: str
    utt_id: str


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
    resampled = torchaudio.functional.resample(torch.from_numpy(wave), sr, sample_rate).numpy()
    return np.ascontiguousarray(resampled, dtype=np.float32), True


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
    jobs: list[_Job],
    *,
    shard_utterances: int,
    workers: int,
    run_id: str,
    progress: bool = True,
    samples_hint: dict[str, int] | None = None,
) -> tuple[list[str], int]:
    """Compute ``jobs`` (audio not in ``cache``) into new shards; returns (new shard ids, resampled count)."""
    computer = LogMelComputer(cache.frontend)
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


def extract_features(
    ctx: RunContext, *, progress: bool = True, frontend: FeatureConfig | None = None
) -> dict[str, Any]:
    """Stage: log-mel features of the current pool, computing only audio not yet cached.

    ``frontend`` overrides ``config.features`` (search trials); it gets its own cache and
    its own stage name (see :func:`name_features_stage`).
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
    cache = FeatureCache.open(store, fe, workers=workers)
    shards_before = set(cache.shards)

    jobs: list[_Job] = []
    queued: set[str] = set()
    samples_hint: dict[str, int] = {}
    for utt in pool.utterances:
        if utt.sha256 in cache.entries or utt.sha256 in queued:
            continue
        queued.add(utt.sha256)
        jobs.append(_Job(sha256=utt.sha256, audio_key=pool.audio_key(utt, store), utt_id=utt.utt_id))
        samples_hint[utt.sha256] = int(utt.duration * fe.sample_rate)

    compute_started = time.perf_counter()
    new_shards, resampled = compute_missing_features(
        store, cache, jobs, shard_utterances=feature_config.shard_utterances, workers=workers,
        run_id=ctx.run_id, progress=progress, samples_hint=samples_hint,
    )
    compute_s = time.perf_counter() - compute_started

    entries = [cache.entries[utt.sha256] for utt in pool.utterances]
    utterances = [
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
    used_shards = sorted({u["shard"] for u in utterances})
    shard_stats = {s: cache.read_stats(s) for s in used_shards}
    frames = np.array([u["frames"] for u in utterances], dtype=np.int64)
    per_utt = np.stack([shard_stats[e.shard][e.row] for e in entries])
    mean, var = combine_stats(frames, per_utt)
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        raise RuntimeError(f"non-finite feature statistics over pool {pool.version!r}: a cached shard is corrupt; "
                           f"delete {store.uri(cache.prefix)} to rebuild it")
    stats = {"frames": int(frames.sum()), "mean": mean.tolist(), "var": var.tolist()}

    index = {
        "frontend": fe.settings,
        "storage": fe.storage,
        "frontend_hash": fe.hash,
        "cache_prefix": cache.prefix,
        "pool_version": pool.version,
        "n_mels": fe.n_mels,
        "dtype": np.dtype(STORAGE_DTYPE).name,
        "shards": used_shards,
        "stats": stats,
        "utterances": utterances,
    }
    index_key = ctx.stage_key(stage, "index.json")
    stats_key = ctx.stage_key(stage, "stats.json")
    store.put_text(stats_key, json.dumps({"frontend_hash": fe.hash, "pool_version": pool.version, **stats}))
    store.put_text(index_key, json.dumps(index, separators=(",", ":")))

    computed = len(jobs)
    audio_seconds = float(sum(u["duration"] for u in utterances))
    return {
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
        "shards": len(used_shards),
        "shards_before": len(shards_before),
        "frames": int(frames.sum()),
        "audio_seconds": round(audio_seconds, 3),
        "workers": workers,
        "compute_seconds": round(compute_s, 3),
        "elapsed_seconds": round(time.perf_counter() - started, 3),
        "computed_utts_per_s": round(computed / compute_s, 1) if computed and compute_s > 0 else None,
    }


# --------------------------------------------------------------------------- loader side


def load_feature_index(store: ObjectStore, run_id: str, *, stage: str = FEATURES_STAGE) -> dict[str, Any]:
    """The ``index.json`` a features stage wrote for ``run_id``."""
    key = join("runs", run_id, stage, "index.json")
    if not store.exists(key):
        raise FileNotFoundError(
            f"no feature index at {store.uri(key)}: run the {stage!r} stage for run {run_id!r} first"
        )
    return json.loads(store.get_text(key))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asr-retune" / "features"


class FeatureStore:
    """Random access to one run's features: ``store[i] -> (features [frames, n_mels], text)``.

    Shards are memory-mapped: straight from a local store's folder, or from a local copy
    (``cache_dir``, default ``~/.cache/asr-retune/features``) downloaded once per shard
    from S3. Shards are immutable and named by content, so a local copy never goes stale.
    Safe to pickle into DataLoader workers (open maps are dropped and reopened there).
    """

    def __init__(self, store: ObjectStore, index: dict[str, Any], *, cache_dir: str | os.PathLike | None = None):
        self.store = store
        self.index = index
        self.utterances: list[dict[str, Any]] = index["utterances"]
        self.mean = np.asarray(index["stats"]["mean"], dtype=np.float32)
        self.var = np.asarray(index["stats"]["var"], dtype=np.float32)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._maps: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, store: ObjectStore, run_id: str, *, stage: str = FEATURES_STAGE,
             cache_dir: str | os.PathLike | None = None) -> FeatureStore:
        return cls(store, load_feature_index(store, run_id, stage=stage), cache_dir=cache_dir)

    @property
    def n_mels(self) -> int:
        return int(self.index["n_mels"])

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        return self.read_features(i), self.utterances[i]["text"]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def read_features(self, i: int) -> np.ndarray:
        """Utterance ``i``'s features: a read-only float16 view into its memory-mapped shard."""
        u = self.utterances[i]
        return self.map_shard(u["shard"])[u["offset"]:u["offset"] + u["frames"]]

    def normalize(self, feats: np.ndarray) -> np.ndarray:
        """float32 features standardized with the pool's per-bin mean and variance."""
        return (feats.astype(np.float32) - self.mean) / np.sqrt(self.var + 1e-8)

    def map_shard(self, shard: str) -> np.ndarray:
        mapped = self._maps.get(shard)
        if mapped is None:
            with self._lock:
                mapped = self._maps.get(shard)
                if mapped is None:
                    mapped = np.load(self.locate_shard(shard), mmap_mode="r")
                    self._maps[shard] = mapped
        return mapped

    def locate_shard(self, shard: str) -> Path:
        """A local path of the shard's ``.npy``, downloading it first if the store is remote."""
        key = join(self.index["cache_prefix"], "shards", shard + ".npy")
        if isinstance(self.store, LocalStore):
            return self.store.base / key
        path = self.cache_dir / self.index["frontend_hash"] / f"{shard}.npy"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.store.download_file(key, path)  # atomic: a partial download never has the final name
        return path
