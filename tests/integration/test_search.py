"""Ray Tune ASHA + Optuna TPE search on a real (tiny) proxy set."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.config import Config, DemoConfig, ProxyConfig, SearchConfig, TrainConfig
from pipeline.corpus import build_demo_corpus
from pipeline.features import extract_features
from pipeline.ingest import ingest
from pipeline.proxy import sample_proxy
from pipeline.run import RunContext
from pipeline.storage import open_store

pytestmark = pytest.mark.integration

SPACE = {
    "params": {
        "n_mels": {"kind": "choice", "values": [40]},
        "encoder": {"kind": "choice", "values": ["conformer"]},
        "num_layers": {"kind": "int", "low": 1, "high": 2},
        "d_model": {"kind": "choice", "values": [32, 64]},
        "attention_heads": {"kind": "choice", "values": [2, 4], "when": {"encoder": ["conformer", "transformer"]}},
        "lr": {"kind": "loguniform", "low": 1e-4, "high": 5e-3},
        "optimizer": {"kind": "choice", "values": ["adamw", "sgd"]},
        "beta2": {"kind": "uniform", "low": 0.95, "high": 0.999, "when": {"optimizer": "adamw"}},
        "momentum": {"kind": "uniform", "low": 0.8, "high": 0.95, "when": {"optimizer": "sgd"}},
    }
}


@pytest.fixture(scope="module")
def proxy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    config = Config(
        demo=DemoConfig(weeks=1, utterances_per_week=40, golden_utterances=10, max_digits=2),
        proxy=ProxyConfig(fraction=1.0, dev_fraction=0.25),
        train=TrainConfig(batch_size=8, warmup_steps=5),
        search=SearchConfig(
            space_file=str(space), trials=5, budget_s=300, max_epochs=3, grace_period=1, reduction_factor=2,
            max_concurrent=2, metric="dev_loss", warm_start_top_k=1,
        ),
    )
    config.mlflow.tracking_uri = f"sqlite:///{root}/mlflow.db"
    config.mlflow.artifact_root = str(root / "mlartifacts")
    store = open_store(str(root / "store"))
    build_demo_corpus(store, config.demo, config.audio.sample_rate, progress=False)
    ctx = RunContext(run_id="search-1", config=config, store=store)
    ingest(ctx, progress=False)
    extract_features(ctx, progress=False)
    sample_proxy(ctx)
    yield ctx
    import ray

    ray.shutdown()


def test_search_stops_weak_trials_and_tracks_everything(proxy_run):
    import mlflow

    from pipeline.search import search

    ctx = proxy_run
    production = {"encoder": "conformer", "d_model": 64, "num_layers": 1, "attention_heads": 4, "lr": 1e-3, "optimizer": "adamw", "beta2": 0.98}
    summary = search(ctx, production_hparams=production, progress=False)
    board = json.loads(ctx.store.get_text("runs/search-1/search/leaderboard.json"))
    assert len(board) == 5 == summary["trials"]
    statuses = {r["status"] for r in board}
    assert "asha_stopped" in statuses and "completed" in statuses, statuses
    assert summary["trial_epochs"] < summary["full_budget_epochs"]
    # the warm-start point (production's config) was evaluated first
    assert summary["warm_start"] == ["production"]
    first = min(board, key=lambda r: r["trial_number"])
    assert first["config"]["d_model"] == 64 and first["config"]["lr"] == pytest.approx(1e-3)
    best = json.loads(ctx.store.get_text("runs/search-1/search/best_config.json"))
    assert best == board[0]["config"]
    for name in ("curves.png", "importance.json"):
        assert ctx.store.exists(f"runs/search-1/search/{name}")
    # every trial is a nested MLflow run under one parent
    mlflow.set_tracking_uri(ctx.config.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["asr-retune-search"], filter_string="tags.asr_run_id = 'search-1'")
    assert (runs["tags.asr_kind"] == "trial").sum() == 5 and (runs["tags.asr_kind"] == "search").sum() == 1
    # a finished stage is skipped; the earlier run's best trials warm-start the next run
    assert search(ctx)["skipped"] is True
    from pipeline.search import warm_start_points
    from pipeline.space import load_space

    ctx2 = RunContext(run_id="search-2", config=ctx.config, store=ctx.store)
    points, sources = warm_start_points(ctx2, load_space(ctx.config.search.space_path()), None)
    assert len(points) == 1 and sources[0].startswith("run:search-1")
