"""Mixed precision in the training loop: fp16 overflow steps are skipped, not divergence; CPU stays float32.

The fp16 path runs on CUDA only; here a CPU ``GradScaler`` stands in for the CUDA one, so the
loop's skip-and-halve logic is exercised without a GPU (``tools/gpu-check.sh`` runs the real one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.asr.training import MAX_OVERFLOW_SKIPS, TrainingDiverged, _Loop, amp_dtype
from pipeline.config import ModelConfig, TrainConfig
from pipeline.data.dataset import ArrayDataset

SMALL = ModelConfig(encoder="conformer", d_model=32, num_layers=1, attention_heads=2, time_masks=0, freq_masks=0, dropout=0.0)


@pytest.fixture()
def loop_and_data():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    data = ArrayDataset([rng.normal(size=(60, 40)).astype(np.float32) for _ in range(4)], ["one two", "three", "four", "five six"])
    cfg = TrainConfig(epochs=1, batch_size=2, base_batch_size=2, warmup_steps=1, use_gpu=True, amp="fp16")
    loop = _Loop(SMALL, cfg, data.frames(), 40, None, None, None)
    return loop, data


def _params(loop: _Loop) -> list[torch.Tensor]:
    return [p.detach().clone() for p in loop.model.parameters()]


def test_cpu_ignores_amp_and_has_no_scaler(loop_and_data):
    loop, _ = loop_and_data
    assert not torch.cuda.is_available()  # this suite runs on CPU; the GPU check is tools/gpu-check.sh
    assert loop.amp_dtype is None and loop.scaler is None
    assert "scaler" not in loop.checkpoint_state(0)
    assert amp_dtype("off") is None


def test_fp16_overflow_is_skipped_and_halves_the_scale(loop_and_data):
    loop, data = loop_and_data
    loop.scaler = torch.amp.GradScaler("cpu")  # what an fp16 run on CUDA holds
    scale0 = loop.scaler.get_scale()
    loop._backward(data, [0, 1], 0, 0)
    assert loop._step(0, 0) > 0  # a finite step applies
    before, lr_step = _params(loop), loop.schedule.step_sched.last_epoch
    loop._backward(data, [2, 3], 0, 1)
    next(loop.model.parameters()).grad.view(-1)[0] = float("inf")
    norm = loop._step(0, 1)
    assert norm == loop.last_norm and np.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(loop)))  # no update
    assert loop.scaler.get_scale() == scale0 / 2 and loop.overflows == 1
    assert loop.schedule.step_sched.last_epoch == lr_step  # the schedule counts applied steps only
    assert loop.checkpoint_state(0)["scaler"]["scale"] == scale0 / 2
    loop._backward(data, [0, 1], 0, 2)
    loop._step(0, 2)
    assert loop.overflows == 0 and not all(torch.equal(a, b) for a, b in zip(before, _params(loop)))


def test_overflow_every_step_is_divergence(loop_and_data):
    loop, data = loop_and_data
    loop.scaler = torch.amp.GradScaler("cpu")
    for b in range(MAX_OVERFLOW_SKIPS):
        loop._backward(data, [0, 1], 0, b)
        next(loop.model.parameters()).grad.view(-1)[0] = float("nan")
        loop._step(0, b)
    assert loop.overflows == MAX_OVERFLOW_SKIPS
    loop._backward(data, [0, 1], 0, MAX_OVERFLOW_SKIPS)
    next(loop.model.parameters()).grad.view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="gradient norm nan"):
        loop._step(0, MAX_OVERFLOW_SKIPS)


def test_scaler_state_is_restored(loop_and_data):
    loop, data = loop_and_data
    loop.scaler = torch.amp.GradScaler("cpu")
    loop._backward(data, [0, 1], 0, 0)  # the scaler's state starts with its first scaled loss
    loop.scaler.update(1024.0)
    state = loop.checkpoint_state(0)
    other = _Loop(SMALL, loop.cfg, data.frames(), 40, None, None, None)
    other.scaler = torch.amp.GradScaler("cpu")
    other.restore(state)
    assert other.scaler.get_scale() == 1024.0
