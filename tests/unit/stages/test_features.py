"""Log-mel extraction: values equal torchaudio's, the cache is reused, stats are right."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from support.pool_factory import UttSpec, make_specs, write_pool

import pipeline.asr.extraction as extraction
from pipeline.asr.extraction import name_features_stage
from pipeline.asr.frontend import FrontEnd, compute_log_mel, frontend_settings
from pipeline.config import Config, FeatureConfig
from pipeline.data.features import FeatureStore, load_feature_index
from pipeline.run import RunContext
from pipeline.stages.features import extract_features
from pipeline.storage import LocalStore


def make_ctx(store: LocalStore, run_id: str, **features_overrides) -> RunContext:
    config = Config(features=FeatureConfig(**{"shard_utterances": 16, "workers": 2, **features_overrides}))
    return RunContext(run_id=run_id, config=config, store=store)


def read_wave(store: LocalStore, row: dict) -> np.ndarray:
    sha = row["sha256"]
    wave, _ = sf.read(io.BytesIO(store.get_bytes(f"state/audio/{sha[:2]}/{sha}.wav")), dtype="float32")
    return wave


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several batched STFTs per shard and shards cut across them, even in a tiny pool."""
    monkeypatch.setattr(extraction, "_CHUNK_UTTERANCES", 5)


# today's front end before issue #15: no level normalization, no dither, no per-utterance mean
PLAIN = {"level": "none", "dither_db": None, "normalize": "global"}


def test_frames_and_values_match_torchaudio_melspectrogram(store):
    durations = [0.25, 0.5, 1.0, 1.2345, 2.0]
    rows = write_pool(store, [UttSpec(f"d{i}", "s", "g", d) for i, d in enumerate(durations)])
    summary = extract_features(make_ctx(store, "r1", **PLAIN), progress=False)
    fs = FeatureStore.open(store, "r1")
    fe = FrontEnd.from_config(FeatureConfig(**PLAIN), 8000)
    assert (fe.win_length, fe.hop_length, fe.n_fft) == (200, 80, 256)
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=8000, n_fft=256, win_length=200, hop_length=80, n_mels=40)
    shared = fe.build_module()  # pipeline.asr.frontend.LogMel: what training and the exported model use
    for i, row in enumerate(rows):
        wave = read_wave(store, row)
        feats, text = fs[i]
        expected = torch.log(mel(torch.from_numpy(wave)) + 1e-6).T.numpy()  # [frames, n_mels]
        assert feats.shape == expected.shape == (1 + len(wave) // 80, 40)
        assert feats.dtype == np.float16 and text == row["text"]
        np.testing.assert_allclose(feats.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
        from_shared = shared(torch.from_numpy(wave)).numpy()
        np.testing.assert_allclose(feats.astype(np.float32), from_shared, rtol=2e-3, atol=2e-3)
    assert summary["frames"] == sum(1 + len(read_wave(store, r)) // 80 for r in rows)
    assert summary["computed"] == len(rows) and summary["reused"] == 0
    # the index carries the shared front-end settings: the export rebuilds the same transform from them
    assert fs.index["frontend"] == frontend_settings(FeatureConfig(**PLAIN), 8000)


@pytest.mark.parametrize("normalize", ["utterance", "sliding"])
def test_robust_frontend_shards_equal_the_exported_module(store, normalize):
    """Level, dither and mean normalization: the batched extraction gives what LogMel (the
    exported model's front end) computes on each utterance alone."""
    rows = write_pool(store, [UttSpec(f"d{i}", "s", "g", d) for i, d in enumerate([0.3, 0.8, 1.5, 2.2])])
    extract_features(make_ctx(store, "r1", normalize=normalize), progress=False)
    fs = FeatureStore.open(store, "r1")
    shared = FrontEnd.from_config(FeatureConfig(normalize=normalize), 8000).build_module()
    for i, row in enumerate(rows):
        feats, _ = fs[i]
        expected = shared(torch.from_numpy(read_wave(store, row))).numpy()
        np.testing.assert_allclose(feats.astype(np.float32), expected, rtol=3e-3, atol=3e-3)


def test_second_week_computes_only_new_audio_and_reuses_old_shards(store):
    week1 = write_pool(store, make_specs(40), version="v1")
    first = extract_features(make_ctx(store, "r1"), progress=False)
    assert (first["computed"], first["reused"], first["new_shards"]) == (40, 0, 3)  # 16 + 16 + 8
    cache_keys = sorted(k for k in store.list(first["cache_prefix"] + "/"))
    before = {k: store.get_bytes(k) for k in cache_keys}

    write_pool(store, make_specs(2, prefix="new", seed=9), version="v2", reuse_rows=week1)
    second = extract_features(make_ctx(store, "r2"), progress=False)
    assert second["pool_version"] == "v2"
    assert (second["computed"], second["reused"], second["new_shards"]) == (2, 40, 1)
    assert second["shards"] == 4 and second["utterances"] == 42
    assert {k: store.get_bytes(k) for k in cache_keys} == before  # old shards untouched

    old_shards = set(load_feature_index(store, "r1")["shards"])
    new_ids = {u["utt_id"] for u in load_feature_index(store, "r2")["utterances"] if u["shard"] not in old_shards}
    assert new_ids == {"new00000", "new00001"}


def test_finished_stage_is_skipped_in_the_same_run(store):
    write_pool(store, make_specs(6))
    ctx = make_ctx(store, "r1")
    assert extract_features(ctx, progress=False)["skipped"] is False
    again = extract_features(ctx, progress=False)
    assert again["skipped"] is True and again["computed"] == 6


def test_other_frontend_gets_its_own_cache_and_stage(store):
    write_pool(store, make_specs(10))
    ctx = make_ctx(store, "r1")
    base = extract_features(ctx, progress=False)
    other_fc = FeatureConfig(n_mels=64, win_ms=32.0, hop_ms=10.0, shard_utterances=16, workers=2)
    other = extract_features(ctx, progress=False, frontend=other_fc)
    assert other["frontend_hash"] != base["frontend_hash"]
    assert other["cache_prefix"] != base["cache_prefix"]
    assert other["computed"] == 10 and other["reused"] == 0
    stage = name_features_stage(ctx, other_fc)
    assert stage.startswith("features-") and other["stage"] == stage
    fs = FeatureStore.open(store, "r1", stage=stage)
    assert fs.n_mels == 64 and fs[0][0].shape[1] == 64
    # a later run (another trial, another week) reuses that setting's cache
    later = extract_features(make_ctx(store, "r2"), progress=False, frontend=other_fc)
    assert (later["computed"], later["reused"]) == (0, 10)
    # the configured front end, passed explicitly, is the plain stage
    assert name_features_stage(ctx, FeatureConfig(shard_utterances=3)) == "features"


def test_pool_statistics_equal_numpy_over_all_frames(store):
    rows = write_pool(store, make_specs(30, seed=3))
    # duplicate audio under a second utt id counts twice, like any pool row
    write_pool(store, [], version="v2", reuse_rows=rows + [{**rows[0], "utt_id": "dup"}])
    summary = extract_features(make_ctx(store, "r1"), progress=False)
    assert summary["computed"] == 30 and summary["utterances"] == 31
    fs = FeatureStore.open(store, "r1")
    allframes = np.concatenate([fs[i][0].astype(np.float64) for i in range(len(fs))])
    assert allframes.shape[0] == summary["frames"] == fs.index["stats"]["frames"]
    np.testing.assert_allclose(fs.index["stats"]["mean"], allframes.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fs.index["stats"]["var"], allframes.var(axis=0), rtol=1e-7, atol=1e-9)
    normalized = np.concatenate([fs.normalize(fs[i][0]) for i in range(len(fs))])
    np.testing.assert_allclose(normalized.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(normalized.std(axis=0), 1, atol=1e-3)


def test_shards_memory_map_and_slices_are_the_utterances(store):
    rows = write_pool(store, make_specs(20, seed=5))
    summary = extract_features(make_ctx(store, "r1", shard_utterances=7), progress=False)
    assert summary["new_shards"] == 3
    index = load_feature_index(store, "r1")
    fe = FrontEnd.from_config(FeatureConfig(), 8000)
    for shard in index["shards"]:
        mapped = np.load(store.base / index["cache_prefix"] / "shards" / f"{shard}.npy", mmap_mode="r")
        assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16 and mapped.shape[1] == 40
    fs = FeatureStore.open(store, "r1")
    for i, row in enumerate(rows):
        feats = fs.read_features(i)
        assert isinstance(feats, np.memmap)
        np.testing.assert_array_equal(feats, compute_log_mel(read_wave(store, row), fe))
    clone = pickle.loads(pickle.dumps(fs))  # DataLoader workers get a copy without open maps
    np.testing.assert_array_equal(clone[3][0], fs[3][0])


def test_bad_frontend_fails_with_advice(store):
    with pytest.raises(ValueError, match="lower n_mels or raise win_ms"):
        extract_features(make_ctx(store, "r1"), progress=False, frontend=FeatureConfig(n_mels=200))
    assert list(store.list("runs/")) == []  # nothing started


def test_missing_pool_says_run_ingest(store):
    with pytest.raises(FileNotFoundError, match="run the ingest stage first"):
        extract_features(make_ctx(store, "r1"), progress=False)
