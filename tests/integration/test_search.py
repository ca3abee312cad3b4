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


def _production(tmp_path, monkeypatch, model_cfg: dict) -> None:
    """Production is a registered model whose exported meta.json says how it was built."""
    from support.model_factory import tiny_model

    from pipeline.asr.export import export_model
    from pipeline.asr.frontend import frontend_settings
    from pipeline.config import FeatureConfig
    from pipeline.tracking.models import RegisteredModel

    path = export_model(tiny_model("mute"), frontend_settings(FeatureConfig(), 8000), tmp_path / "prod.pt",
                        {"model": model_cfg, "train": {"lr": 1e-3, "optimizer": "adamw", "beta2": 0.98, "epochs": 50},
                         "features": {"n_mels": 40, "win_ms": 25.0, "hop_ms": 10.0}})
    monkeypatch.setattr("pipeline.tracking.production_model", lambda cfg: RegisteredModel("asr", "3", path, {}, "week-1"))


def test_search_starts_from_production_and_tracks_everything(proxy_run, tmp_path, monkeypatch):
    import mlflow

    from pipeline.stages.search.incumbent import INCUMBENT_KEY
    from pipeline.stages.search.selection import INCUMBENT_KEPT, select
    from pipeline.stages.search.stage import search
    from pipeline.stages.search.trial import trial_hparams

    ctx = proxy_run
    # nobody passes production's configuration: the search reads it from the registered model
    _production(tmp_path, monkeypatch, {"encoder": "conformer", "d_model": 64, "num_layers": 1, "attention_heads": 4})
    summary = search(ctx, progress=False)
    board = json.loads(ctx.store.get_text("runs/search-1/search/leaderboard.json"))
    assert len(board) == 5 == summary["trials"]
    statuses = {r["status"] for r in board}
    assert "asha_stopped" in statuses and "completed" in statuses, statuses
    assert summary["trial_epochs"] < summary["full_budget_epochs"]
    # the incumbent is trial 0, production's configuration, and it ran to the top rung
    assert summary["warm_start"] == ["production"] and summary["incumbent"]["version"] == "3"
    first = min(board, key=lambda r: r["trial_number"])
    assert first["incumbent"] and first["source"] == "production" and first["status"] == "completed"
    assert first["config"]["d_model"] == 64 and first["config"]["lr"] == pytest.approx(1e-3)
    assert [r["trial_id"] for r in board if r["incumbent"]] == [first["trial_id"]]
    assert all(INCUMBENT_KEY not in r["config"] for r in board)
    # the selection: as the leaderboard says, with its reason; full training gets the chosen configuration
    sel = summary["selection"]
    assert sel == select(board, ctx.config.search.min_improvement) and sel["reason"]
    best = json.loads(ctx.store.get_text("runs/search-1/search/best_config.json"))
    assert best.pop("_selection") == sel
    chosen = first if sel["decision"] == INCUMBENT_KEPT else next(r for r in board if r["trial_id"] == sel["winner"])
    assert best == summary["best_config"] == trial_hparams(chosen["config"], best)
    assert best["d_model"] == chosen["config"]["d_model"] and "epochs" not in best
    for name in ("curves.png", "importance.json"):
        assert ctx.store.exists(f"runs/search-1/search/{name}")
    # every trial is a nested MLflow run under one parent
    mlflow.set_tracking_uri(ctx.config.mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["asr-retune-search"], filter_string="tags.asr_run_id = 'search-1'")
    assert (runs["tags.asr_kind"] == "trial").sum() == 5 and (runs["tags.asr_kind"] == "search").sum() == 1
    # a finished stage is skipped; the earlier run's best trials warm-start the next run
    assert search(ctx)["skipped"] is True
    from pipeline.stages.search.incumbent import find_incumbent
    from pipeline.stages.search.space import load_space
    from pipeline.stages.search.stage import warm_start_points

    monkeypatch.setattr("pipeline.tracking.production_model", lambda cfg: None)  # a cold start
    ctx2 = RunContext(run_id="search-2", config=ctx.config, store=ctx.store)
    points = warm_start_points(ctx2, load_space(ctx.config.search.space_path()), find_incumbent(ctx2))
    assert len(points) == 2 and points[0][1]["incumbent"] == "config-default"
    assert points[1][1]["warm_start"].startswith("run:search-1")


def test_an_impossible_margin_keeps_the_incumbent_configuration(tmp_path, monkeypatch):
    """Every trial loses to the incumbent by the margin: full training gets the incumbent's configuration."""
    from support.run_factory import make_proxy_run

    from pipeline.stages.search.stage import search

    ctx = make_proxy_run(tmp_path, "keep", trials=3, max_epochs=2, grace_period=1, min_improvement=1.0,
                         warm_start_top_k=0)
    monkeypatch.setattr("pipeline.tracking.production_model", lambda cfg: None)
    summary = search(ctx, progress=False)
    assert summary["selection"]["decision"] == "incumbent-kept"
    assert summary["incumbent"]["source"] == "config-default"
    board = json.loads(ctx.store.get_text("runs/keep/search/leaderboard.json"))
    inc = next(r for r in board if r["incumbent"])
    assert inc["source"] == "config-default" and summary["best_trial"] == inc["trial_id"]
    default = {**ctx.config.model.model_dump(), "lr": ctx.config.train.lr, "n_mels": ctx.config.features.n_mels}
    assert {k: summary["best_config"][k] for k in default} == default
    # the incumbent's top-rung weights are kept for full training (train.init: search)
    from pipeline.asr.training import resolve_hparams
    from pipeline.stages.train import initial_weights

    assert summary["chosen_weights"]["saved"] is True and summary["chosen_weights"]["trial_id"] == inc["trial_id"]
    assert summary["chosen_weights"]["epoch"] == inc["top_rung"]["epoch"] == summary["rungs"]["max_t"]
    model_cfg, train_cfg = resolve_hparams(ctx.config, {k: v for k, v in summary["best_config"].items()
                                                        if k not in ("n_mels", "win_ms", "hop_ms")})
    state, record = initial_weights(ctx, model_cfg, train_cfg.model_copy(update={"init": "search"}),
                                    summary["best_config"]["n_mels"])
    assert record["init"] == "search" and record["search_trial"] == inc["trial_id"] and state, record
