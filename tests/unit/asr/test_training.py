"""The one training loop: it learns, it resumes exactly, it stops on divergence."""

from __future__ import annotations

from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.asr.export import export_model, load_exported
from pipeline.asr.frontend import build_frontend, frontend_settings
from pipeline.asr.metrics import paired_bootstrap, score_pairs
from pipeline.asr.training import TrainingDiverged, effective_lr, make_batches, train_model
from pipeline.config import PROJECT_ROOT, FeatureConfig, ModelConfig, TrainConfig
from pipeline.data.dataset import ArrayDataset, split_by_utterance
from pipeline.data.text import DIGIT_WORDS

FSDD = PROJECT_ROOT.parent / "shared" / "data" / "fsdd" / "recordings"
SEQS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 0), (2, 5)]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    fe = build_frontend(FeatureConfig(), 8000)
    waves, feats, texts = [], [], []
    for k, digits in enumerate(SEQS):
        wave = np.concatenate([sf.read(FSDD / f"{d}_jackson_{10 + k}.wav", dtype="float32")[0] for d in digits])
        waves.append(wave)
        feats.append(fe(torch.from_numpy(wave)).numpy())
        texts.append(" ".join(DIGIT_WORDS[d] for d in digits))
    allf = np.concatenate(feats)
    return waves, ArrayDataset(feats, texts), allf.mean(0), allf.var(0)


SMALL = ModelConfig(encoder="conformer", d_model=64, num_layers=2, attention_heads=4, time_masks=0, freq_masks=0, dropout=0.0)


def test_tiny_model_overfits_to_wer_zero_and_export_agrees(tiny, tmp_path: Path):
    waves, data, mean, var = tiny
    cfg = TrainConfig(epochs=150, batch_size=6, base_batch_size=6, lr=3e-3, warmup_steps=20, schedule="noam", weight_decay=0.0)
    model, hist = train_model(SMALL, cfg, data, data, n_mels=40, feature_mean=mean, feature_var=var)
    assert hist[0].dev_wer == 1.0  # it started knowing nothing
    assert hist[-1].dev_wer == 0.0, [h.dev_wer for h in hist[-5:]]
    path = export_model(model, frontend_settings(FeatureConfig(), 8000), tmp_path / "model.pt", {"version": "t"})
    exported = load_exported(path)
    assert exported.transcribe(waves) == [data.text(i) for i in range(len(data))]


def _train(data, mean, var, epochs, **kw):
    cfg = TrainConfig(epochs=epochs, batch_size=2, base_batch_size=2, lr=2e-3, warmup_steps=5, seed=3)
    model_cfg = SMALL.model_copy(update={"dropout": 0.1, "time_masks": 1, "freq_masks": 1})
    return train_model(model_cfg, cfg, data, data, n_mels=40, feature_mean=mean, feature_var=var, **kw)


def test_resume_after_crash_matches_uninterrupted_run(tiny):
    _, data, mean, var = tiny
    ref_model, ref_hist = _train(data, mean, var, 4)

    saved = {}

    def keep(rep, state):
        saved["state"] = state

    with pytest.raises(KeyboardInterrupt):
        _train(data, mean, var, 4, report=keep, stop_after_batches=3 * 2 + 1)  # 3 batches/epoch: dies in epoch 3
    assert saved["state"]["epoch"] == 2
    model, hist = _train(data, mean, var, 4, resume=saved["state"])
    assert [h.epoch for h in hist] == [1, 2, 3, 4]
    for a, b in zip(hist, ref_hist):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-6, abs=1e-7)
        assert a.dev_wer == b.dev_wer
    for (k, p), (_, q) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-6), k


def test_diverging_loss_stops_with_status(tiny):
    _, data, mean, var = tiny
    cfg = TrainConfig(epochs=8, batch_size=2, optimizer="sgd", lr=10.0, momentum=0.99, warmup_steps=1, clip_norm=1e9, max_grad_norm_abort=1e9)
    with pytest.raises(TrainingDiverged) as err:
        train_model(SMALL, cfg, data, data, n_mels=40, feature_mean=mean, feature_var=var)
    assert err.value.status == "diverged"
    assert "non-finite loss" in str(err.value) or "gradient norm" in str(err.value)


def test_exploding_gradient_norm_stops(tiny):
    _, data, mean, var = tiny
    cfg = TrainConfig(epochs=1, batch_size=6, max_grad_norm_abort=1e-6)
    with pytest.raises(TrainingDiverged, match="max_grad_norm_abort"):
        train_model(SMALL, cfg, data, data, n_mels=40, feature_mean=mean, feature_var=var)


def test_wer_agrees_with_jiwer():
    refs = ["one two three", "four five", "six", "seven eight nine zero"]
    hyps = ["one too three", "four five five", "", "seven nine zero"]
    counts = score_pairs(refs, hyps)
    assert sum(c[0] for c in counts) / sum(c[1] for c in counts) == pytest.approx(jiwer.wer(refs, [h or "" for h in hyps]))
    assert [c[0] for c in counts] == [1, 1, 1, 1]
    assert sum(c[2] for c in counts) / sum(c[3] for c in counts) == pytest.approx(jiwer.cer(refs, hyps))


def test_normalizer_applies_before_scoring():
    (e, w, _, _), = score_pairs(["Call 415, now!"], ["call four one five now"])
    assert (e, w) == (0, 5)


def test_paired_bootstrap_brackets_the_difference():
    rng = np.random.default_rng(0)
    words = rng.integers(1, 8, 400)
    a = rng.binomial(words, 0.10)
    b = rng.binomial(words, 0.20)
    ci = paired_bootstrap(a, b, words, n_resamples=1000, seed=1)
    assert ci["ci_low"] < ci["delta"] < ci["ci_high"] < 0
    same = paired_bootstrap(a, a, words, n_resamples=200, seed=1)
    assert same["ci_low"] == same["ci_high"] == 0


def test_effective_batch_scaling_rule():
    cfg = TrainConfig(lr=1e-3, batch_size=16, grad_accum=4, base_batch_size=32)
    assert effective_lr(cfg, world_size=2) == pytest.approx(1e-3 * 16 * 4 * 2 / 32)


def test_batches_depend_only_on_seed_and_epoch():
    frames = np.arange(100)
    assert make_batches(frames, 8, 1, 2) == make_batches(frames, 8, 1, 2)
    assert make_batches(frames, 8, 1, 2) != make_batches(frames, 8, 1, 3)
    flat = sorted(i for b in make_batches(frames, 8, 1, 2) for i in b)
    assert flat == list(range(100))


def test_split_by_utterance_is_disjoint_and_covers_speakers():
    utts = [{"speaker": s} for s in ["a"] * 10 + ["b"] * 5 + ["c"] * 1]
    train, dev = split_by_utterance(utts, 0.2, seed=0)
    assert not set(train) & set(dev) and sorted(train + dev) == list(range(16))
    assert {utts[i]["speaker"] for i in dev} == {"a", "b"}
