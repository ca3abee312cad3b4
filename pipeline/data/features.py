"""The feature shards: log-mel features cached per front end, and a run's index of them.

**Cache.** Features outlive runs: ``state/features/{frontend_hash}/``, where the hash covers
the front-end settings (sample rate, n_mels, window, hop, n_fft, log floor) and the
storage format (:data:`STORAGE_FORMAT`), but not ``shard_utterances`` or ``workers``::

    frontend.json                 the settings and storage format the hash was made from
    shards/{shard}.npy            float16 [frames, n_mels]: its utterances end to end
    shards/{shard}.stats.npy      float64 [utterances, 2, n_mels]: per-utterance mean and M2
    shards/{shard}.json           {"utterances": [{"sha256", "offset", "frames", "samples"}], ...}

An utterance's key is (audio sha256, frontend hash). A shard is immutable; its id is a
hash of its members' sha256s and its ``.json`` is written last, so a shard without one
is an interrupted write and is ignored (and a retry rewrites it under the same id). Pool
statistics are combined from the per-utterance ``.stats.npy`` rows (Chan et al.), so
reused features are never re-read. Features are stored as float16 (half the bytes; the
rounding, at most ~0.008 for values below 16, is far under the spread of log-mels);
every statistic is computed from the stored float16 values, i.e. from what a loader reads.
Shards are plain ``.npy``: ``np.load(path, mmap_mode="r")`` maps them.

**A run's index.** ``runs/{run_id}/{stage}/index.json`` (stage ``features``, or
``features-{hash[:12]}`` for another front end): ``frontend`` (the ``LogMel`` settings),
``storage``, ``frontend_hash``, ``cache_prefix``, ``pool_version``, ``shards``, ``stats``
(per-mel-bin ``mean``/``var`` over every frame of the pool, and ``frames``) and per
utterance ``{utt_id, sha256, shard, offset, frames, text, speaker, group, duration}``.
:class:`FeatureStore` reads it for training.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.storage import LocalStore, ObjectStore, join

FEATURES_STAGE = "features"
FORMAT_VERSION = 1
STORAGE_DTYPE = np.float16
# the storage format of the shards: part of every front end's hash
STORAGE_FORMAT: dict[str, Any] = {"format_version": FORMAT_VERSION, "dtype": np.dtype(STORAGE_DTYPE).name}
CACHE_PREFIX = "state/features"


# --------------------------------------------------------------------------- statistics


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
    """The shards of one front end in a store: which audio (by sha256) they already hold.

    ``frontend_hash`` names the cache; ``settings`` (recorded in ``frontend.json``) and
    ``n_mels`` are the front end's (:class:`pipeline.asr.frontend.FrontEnd`).
    """

    store: ObjectStore
    frontend_hash: str
    settings: dict[str, Any]
    n_mels: int
    entries: dict[str, CacheEntry] = field(default_factory=dict)
    shards: set[str] = field(default_factory=set)

    @property
    def prefix(self) -> str:
        return join(CACHE_PREFIX, self.frontend_hash)

    def shard_key(self, shard: str, suffix: str = ".npy") -> str:
        return join(self.prefix, "shards", shard + suffix)

    @classmethod
    def open(
        cls, store: ObjectStore, frontend_hash: str, settings: dict[str, Any], n_mels: int, workers: int = 8
    ) -> FeatureCache:
        """Read every complete shard's index (its ``.json``); record the settings on first use."""
        cache = cls(store=store, frontend_hash=frontend_hash, settings=dict(settings), n_mels=int(n_mels))
        settings_key = join(cache.prefix, "frontend.json")
        if not store.exists(settings_key):
            record = {"settings": cache.settings, "storage": STORAGE_FORMAT}
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
            "frontend_hash": self.frontend_hash,
            "n_mels": self.n_mels,
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


# --------------------------------------------------------------------------- a run's features


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

    def read_features(self, i: int, copy: int = 0) -> np.ndarray:
        """Utterance ``i``'s features (``copy`` 0) or its augmented copy ``copy`` (1-based):
        a read-only float16 view into the memory-mapped shard."""
        u = self.utterances[i]
        if copy:
            u = u["copies"][copy - 1]
        return self.map_shard(u["shard"])[u["offset"]:u["offset"] + u["frames"]]

    def copies(self, i: int) -> int:
        """How many augmented copies utterance ``i`` has (``augment.copies`` at extraction)."""
        return len(self.utterances[i].get("copies", ()))

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
