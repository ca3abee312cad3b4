"""Ray Tune ASHA + Optuna TPE search on a real (tiny) proxy set."""

from __future__ import annotations

import json

import pytest
from support.run_factory import make_proxy_run

from pipeline.run import RunContext

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def proxy_run(tmp_path_factory):
    yield make_proxy_run(tmp_path_factory.mktemp("search"), "search-1")
    import ray

    ray.shutdown()


def test_search_stops_weak_trials_and_tracks_everything(proxy_run):
    import mlflow

    from pipeline.stages.search.stage import search

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
    from pipeline.stages.search.space import load_space
    from pipeline.stages.search.stage import warm_start_points

    ctx2 = RunContext(run_id="search-2", config=ctx.config, store=ctx.store)
    points, sources = warm_start_points(ctx2, load_space(ctx.config.search.space_path()), None)
    assert len(points) == 2 and sources[0] == "config-default" and sources[1].startswith("run:search-1")
