"""Training-time augmentation (issue #15): each transform does what it says, copies are
cached and picked per epoch, nothing augments in evaluation, and a DDP step runs with all on."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support.pool_factory import UttSpec, write_pool

from pipeline.asr.augment import (
    MelWarp,
    add_noise,
    augment_wave,
    change_speed,
    copy_key,
    draw,
    generate_noise,
    warp_mel,
)
from pipeline.asr.training import build_model, train_model
from pipeline.config import AugmentConfig, Config, FeatureConfig, ModelConfig, TrainConfig
from pipeline.data.dataset import IndexedFeatures
from pipeline.data.features import FeatureStore
from pipeline.run import RunContext
from pipeline.stages.features import extract_features
from pipeline.storage import LocalStore

ALL_ON = AugmentConfig(copies=2, vtlp=0.1)  # speed, gain and noise are on by default once copies > 0
SMALL = ModelConfig(encoder="conformer", d_model=32, num_layers=1, attention_heads=2, dropout=0.0)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_the_length_by_the_factor(factor):
    wave = torch.randn(1, 12345)
    out = change_speed(wave, 8000, factor)
    assert abs(out.size(-1) - 12345 / factor) <= 1


def test_a_warp_of_one_is_the_identity():
    x = torch.randn(3, 50, 40)
    assert torch.equal(warp_mel(x, torch.ones(3)), x)
    warped = warp_mel(x, torch.tensor([0.9, 1.0, 1.1]))
    assert torch.equal(warped[1], x[1]) and not torch.allclose(warped[0], x[0])


@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
@pytest.mark.parametrize("kind", ["white", "pink", "brown"])
def test_added_noise_measures_the_requested_snr(snr, kind):
    rng = np.random.default_rng(0)
    speech = torch.from_numpy((0.2 * rng.standard_normal(16000)).astype(np.float32)).unsqueeze(0)
    noise = torch.from_numpy(generate_noise(kind, 16000, seed=1)).unsqueeze(0)
    out = add_noise(speech, noise, snr)
    residual = out - speech
    measured = 10 * torch.log10(speech.square().sum() / residual.square().sum())
    assert abs(float(measured) - snr) < 0.5


def test_draws_are_seeded_and_cover_the_configured_ranges():
    cfg = AugmentConfig(copies=3)
    draws = [draw(cfg, hashlib.sha256(str(i).encode()).hexdigest(), k) for i in range(200) for k in (1, 2, 3)]
    assert draw(cfg, "a" * 64, 1) == draw(cfg, "a" * 64, 1)
    assert {d.speed for d in draws} == {0.9, 1.0, 1.1}
    assert all(-30.0 <= d.gain_db <= 6.0 for d in draws)
    noisy = [d for d in draws if d.snr_db is not None]
    assert 0.35 < len(noisy) / len(draws) < 0.65 and all(5.0 <= d.snr_db <= 30.0 for d in noisy)
    assert copy_key("a" * 64, cfg, 1) != copy_key("a" * 64, cfg.model_copy(update={"seed": 1}), 1)
    quiet = augment_wave(np.full(8000, 0.1, dtype=np.float32), 8000, draw(cfg, "b" * 64, 1))
    assert np.isfinite(quiet).all()


def test_nothing_augments_in_eval_mode():
    model = build_model(SMALL.model_copy(update={"time_masks": 2, "freq_masks": 2}), 40, vtlp=0.2)
    x, lengths = torch.randn(2, 60, 40), torch.tensor([60, 45])
    model.eval()
    with torch.inference_mode():
        a, _ = model(x, lengths)
        b, _ = model(x, lengths)
    assert torch.equal(a, b)
    model.train()
    warp = MelWarp(0.2).train()
    assert not torch.equal(warp(x), x)
    assert torch.equal(warp.eval()(x), x)


def _pool_with_copies(tmp_path, copies: int):
    store = LocalStore(tmp_path / "store")
    write_pool(store, [UttSpec(f"u{i}", f"s{i % 2}", "g", 0.6 + 0.1 * i, text="one two") for i in range(8)])
    config = Config(features=FeatureConfig(workers=1), augment=AugmentConfig(copies=copies, vtlp=0.1))
    ctx = RunContext(run_id="r1", config=config, store=store)
    summary = extract_features(ctx, progress=False)
    return store, summary


def test_copies_are_cached_and_each_epoch_picks_its_own(tmp_path):
    store, summary = _pool_with_copies(tmp_path, copies=2)
    assert summary["augmented_copies"] == 2 and summary["copies_computed"] == 16
    fs = FeatureStore.open(store, "r1")
    data = IndexedFeatures(fs)
    assert all(fs.copies(i) == 2 for i in range(len(fs)))
    first, again, other = data.for_epoch(0, 1), data.for_epoch(0, 1), data.for_epoch(0, 2)
    picks = [[np.array_equal(v.features(i), data.features(i)) for i in range(len(data))] for v in (first, again, other)]
    assert picks[0] == picks[1], "the pick of an epoch is fixed by (seed, epoch): resume replays it"
    assert not all(picks[0]) or not all(picks[2]), "some epoch reads an augmented copy"
    assert any(not np.array_equal(fs.read_features(i, 1), fs.read_features(i)) for i in range(len(fs)))
    # a second run reuses the cached copies
    ctx = RunContext(run_id="r2", config=Config(features=FeatureConfig(workers=1), augment=AugmentConfig(copies=2)),
                     store=store)
    assert extract_features(ctx, progress=False)["copies_computed"] == 0


def _ddp_worker(rank: int, world: int, init: str, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fs = FeatureStore.open(LocalStore(root), "r1")
        data = IndexedFeatures(fs)
        train_cfg = TrainConfig(epochs=1, batch_size=2, base_batch_size=2, lr=1e-3, warmup_steps=1)
        model_cfg = SMALL.model_copy(update={"time_masks": 1, "freq_masks": 1})
        _, hist = train_model(model_cfg, train_cfg, data, data, n_mels=fs.n_mels, feature_mean=fs.mean,
                              feature_var=fs.var, augment=ALL_ON)
        if rank == 0:
            with open(out, "w") as f:
                f.write(repr(hist[0].train_loss))
    finally:
        dist.destroy_process_group()


def test_a_ddp_training_step_runs_with_every_augmentation_on(tmp_path):
    _pool_with_copies(tmp_path, copies=2)
    out = tmp_path / "loss.txt"
    init = f"file://{tmp_path / 'rendezvous'}"
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_ddp_worker, args=(2, init, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env
    loss = float(out.read_text())
    assert np.isfinite(loss) and loss > 0
