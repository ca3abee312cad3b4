"""Datasets the training loop reads: features in memory, or the feature shards of a run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ArrayDataset:
    """Features already in memory (tests, benchmarks, small proxies)."""

    def __init__(self, feats: Sequence[np.ndarray], texts: Sequence[str]):
        if len(feats) != len(texts):
            raise ValueError(f"{len(feats)} feature arrays but {len(texts)} transcripts")
        self._feats = [np.asarray(f, dtype=np.float32) for f in feats]
        self._texts = list(texts)
        self._frames = np.array([f.shape[0] for f in self._feats], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._feats)

    def frames(self) -> np.ndarray:
        return self._frames

    def features(self, i: int) -> np.ndarray:
        return self._feats[i]

    def text(self, i: int) -> str:
        return self._texts[i]

    def for_epoch(self, seed: int, epoch: int) -> "ArrayDataset":
        """No augmented copies in memory: every epoch trains on the same features."""
        return self

    def subset(self, idx: Sequence[int]) -> "ArrayDataset":
        return ArrayDataset([self._feats[i] for i in idx], [self._texts[i] for i in idx])


class IndexedFeatures:
    """A subset of a run's feature shards (:class:`pipeline.data.features.FeatureStore`), by utterance index.

    With augmented copies in the shards (``augment.copies``), :meth:`for_epoch` gives the
    view one training epoch reads: for each utterance the clean features or one of its
    copies, drawn uniformly from (seed, epoch), so a resumed run reads the same data.
    Lengths for batching stay the clean ones (a speed copy is within ±10 % of it).
    """

    def __init__(self, features, idx: Sequence[int] | None = None, pick: Sequence[int] | None = None):
        self._fs = features
        self._idx = list(range(len(features))) if idx is None else list(idx)
        self._frames = np.array([features.utterances[i]["frames"] for i in self._idx], dtype=np.int64)
        self._pick = list(pick) if pick is not None else None

    def for_epoch(self, seed: int, epoch: int) -> "IndexedFeatures":
        counts = np.array([self._fs.copies(i) for i in self._idx], dtype=np.int64)
        if not counts.any():
            return self
        rng = np.random.default_rng([seed, epoch, 0xA06])
        pick = np.floor(rng.random(len(self._idx)) * (counts + 1)).astype(np.int64)
        return IndexedFeatures(self._fs, self._idx, pick.tolist())

    def __len__(self) -> int:
        return len(self._idx)

    def frames(self) -> np.ndarray:
        return self._frames

    def features(self, i: int) -> np.ndarray:
        return self._fs.read_features(self._idx[i], self._pick[i] if self._pick is not None else 0)

    def text(self, i: int) -> str:
        return self._fs.utterances[self._idx[i]]["text"]

    def utterance(self, i: int) -> dict:
        return self._fs.utterances[self._idx[i]]


def split_by_utterance(utterances: Sequence[dict], dev_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded train/dev split of utterance indices, stratified by speaker (each speaker
    with at least 2 utterances gives at least one to dev). No utterance is in both."""
    by_speaker: dict[str, list[int]] = {}
    for i, u in enumerate(utterances):
        by_speaker.setdefault(str(u.get("speaker", "")), []).append(i)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    dev: list[int] = []
    for speaker in sorted(by_speaker):
        members = np.array(by_speaker[speaker])
        rng.shuffle(members)
        n_dev = int(round(len(members) * dev_fraction))
        if len(members) >= 2:
            n_dev = max(1, n_dev)
        dev.extend(members[:n_dev].tolist())
        train.extend(members[n_dev:].tolist())
    return sorted(train), sorted(dev)
