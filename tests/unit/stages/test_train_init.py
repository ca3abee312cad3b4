"""train.init: full training starts from production's weights, or the search's selected trial's, when the
architecture matches."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Config, TrainConfig


@pytest.fixture
def production(tmp_path, monkeypatch):
    from support.model_factory import export_tiny

    from pipeline.tracking.models import RegisteredModel

    path = export_tiny(tmp_path / "prod.pt", "random", seed=3)
    monkeypatch.setattr("pipeline.tracking.production_model", lambda cfg: RegisteredModel("asr", "5", path, {}, "w1"))
    return path


def _ctx(tmp_path):
    from pipeline.run import RunContext
    from pipeline.storage import open_store

    return RunContext(run_id="r", config=Config(), store=open_store(str(tmp_path / "store")))


def test_scratch_unless_asked(tmp_path, production):
    from support.model_factory import TINY

    from pipeline.stages.train import initial_weights

    state, record = initial_weights(_ctx(tmp_path), TINY, TrainConfig(), 40)
    assert state is None and record == {"init": "scratch", "reason": "train.init: scratch"}


def test_production_weights_when_the_architecture_matches(tmp_path, production):
    from support.model_factory import TINY, tiny_model

    from pipeline.stages.train import initial_weights

    state, record = initial_weights(_ctx(tmp_path), TINY.model_copy(update={"dropout": 0.3}), TrainConfig(init="production"), 40)
    assert record["init"] == "production" and record["production_version"] == "5"
    want = tiny_model("random", seed=3).state_dict()
    assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)


def test_scratch_with_the_reason_when_it_does_not(tmp_path, production):
    from support.model_factory import TINY

    from pipeline.stages.train import initial_weights

    state, record = initial_weights(_ctx(tmp_path), TINY.model_copy(update={"d_model": 64}), TrainConfig(init="production"), 40)
    assert state is None and record["init"] == "scratch" and "d_model 32 -> 64" in record["reason"]
    state, record = initial_weights(_ctx(tmp_path), TINY, TrainConfig(init="production"), 64)
    assert state is None and "n_mels 40 -> 64" in record["reason"]


def test_cold_start_is_scratch(tmp_path, monkeypatch):
    from support.model_factory import TINY

    from pipeline.stages.train import initial_weights

    monkeypatch.setattr("pipeline.tracking.production_model", lambda cfg: None)
    state, record = initial_weights(_ctx(tmp_path), TINY, TrainConfig(init="production"), 40)
    assert state is None and record["reason"] == "no production model (cold start)"


def _save_search_weights(ctx, model_cfg, n_mels: int, seed: int = 4) -> dict:
    from support.model_factory import tiny_model

    from pipeline.run import SEARCH_WEIGHTS

    model = tiny_model("random", seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SEARCH_WEIGHTS[1]
        torch.save({"model": model.state_dict(), "model_cfg": model_cfg.model_dump(), "n_mels": n_mels, "epoch": 6,
                    "trial_id": "t0", "dev_wer": 0.4}, path)
        ctx.store.upload_file(ctx.stage_key(*SEARCH_WEIGHTS), path)
    return model.state_dict()


def test_search_weights_when_the_run_has_them_and_the_architecture_matches(tmp_path):
    from support.model_factory import TINY

    from pipeline.stages.train import initial_weights

    ctx = _ctx(tmp_path)
    state, record = initial_weights(ctx, TINY, TrainConfig(init="search"), 40)
    assert state is None and record["init"] == "scratch" and record["reason"].startswith("no search weights at ")
    want = _save_search_weights(ctx, TINY, 40)
    state, record = initial_weights(ctx, TINY.model_copy(update={"dropout": 0.3}), TrainConfig(init="search"), 40)
    assert record["init"] == "search" and record["search_trial"] == "t0" and record["search_epoch"] == 6
    assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)
    state, record = initial_weights(ctx, TINY.model_copy(update={"d_model": 64}), TrainConfig(init="search"), 40)
    assert state is None and record["init"] == "scratch" and "d_model 32 -> 64" in record["reason"]
    state, record = initial_weights(ctx, TINY, TrainConfig(init="search"), 64)
    assert state is None and "n_mels 40 -> 64" in record["reason"]


def test_the_loop_starts_from_init_state_unless_it_resumes():
    from support.model_factory import TINY, tiny_model

    from pipeline.asr.training import train_model
    from pipeline.data.dataset import ArrayDataset

    rng = np.random.default_rng(0)
    data = ArrayDataset([rng.standard_normal((60, 40)).astype(np.float32) for _ in range(4)], ["one two"] * 4)
    init = tiny_model("random", seed=3).state_dict()
    cfg = TrainConfig(lr=1e-9, weight_decay=0.0, epochs=1, batch_size=2, warmup_steps=0)
    model, _ = train_model(TINY, cfg, data, data, n_mels=40, init_state=init)
    got = model.state_dict()
    assert all(torch.allclose(got[k], init[k], atol=1e-5) for k in init if k not in ("feat_mean", "feat_std"))
