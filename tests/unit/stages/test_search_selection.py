"""The search's incumbent, rungs, Optuna bookkeeping and selection, without running Ray trials."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest

from pipeline.config import Config, SearchConfig, TrainConfig
from pipeline.stages.search.incumbent import CONFIG_DEFAULT, INCUMBENT_KEY, PRODUCTION, find_incumbent, hparams_from_meta
from pipeline.stages.search.rungs import asha_milestones, plan_rungs
from pipeline.stages.search.selection import INCUMBENT_KEPT, WINNER, chosen_row, leaderboard, select
from pipeline.stages.search.trial import score, trial_hparams

MAX_T = 4


def result(number: int, wers: list[float], *, source: str | None = None, config: dict | None = None, error=None):
    """A Tune ``Result`` as the leaderboard reads it: per-epoch dev WER/CER/loss and the config."""
    epochs = list(range(1, len(wers) + 1))
    df = pd.DataFrame({"epoch": epochs, "dev_wer": wers, "dev_cer": [w / 2 for w in wers], "dev_loss": [10.0] * len(wers),
                       "score": [score(w, w / 2, 10.0) for w in wers], "seconds": [1.0] * len(wers),
                       "resumed_from": [0] * len(wers)})
    cfg = {"lr": 1e-3 * (number + 1), **(config or {})}
    if source:
        cfg[INCUMBENT_KEY] = source
    return SimpleNamespace(metrics_dataframe=df, config=cfg, error=error, path=f"/x/trial_{number}",
                           metrics={"trial_id": f"t{number}", "experiment_tag": f"{number}_lr=x", "diverged": False})


def board_of(*results):
    return leaderboard(list(results), MAX_T, "score")


@pytest.mark.parametrize("source", [PRODUCTION, CONFIG_DEFAULT])
def test_leaderboard_holds_the_incumbent_with_its_source(source):
    board = board_of(result(0, [1.0, 0.6, 0.5, 0.4], source=source), result(1, [1.0, 0.9]), result(2, [1.0, 0.5, 0.4, 0.3]))
    inc = [r for r in board if r["incumbent"]]
    assert len(inc) == 1 and inc[0]["source"] == source and inc[0]["trial_id"] == "t0"
    assert INCUMBENT_KEY not in inc[0]["config"]  # markers are not hyperparameters
    # top-rung rows first by their top-rung WER, then the stopped one
    assert [r["trial_id"] for r in board] == ["t2", "t0", "t1"]
    assert board[0]["top_rung"] == {"epoch": 4, "dev_wer": 0.3, "dev_cer": 0.15, "dev_loss": 10.0,
                                    "score": pytest.approx(0.30015)}
    assert board[2]["status"] == "asha_stopped" and board[2]["top_rung"] is None


def test_all_trials_losing_keeps_the_incumbent():
    board = board_of(result(0, [1.0, 0.6, 0.5, 0.30], source=CONFIG_DEFAULT), result(1, [1.0, 0.5, 0.4, 0.35]),
                     result(2, [1.0, 0.2]))  # best early value, but stopped: it cannot win
    sel = select(board, 0.01)
    assert sel["decision"] == INCUMBENT_KEPT and sel["incumbent"] == "t0" and sel["winner"] == "t1"
    assert "under the 1.00-pt margin" in sel["reason"]
    assert chosen_row(board, sel)["trial_id"] == "t0"


def test_a_winner_by_less_than_the_margin_keeps_the_incumbent():
    board = board_of(result(0, [1.0, 0.6, 0.5, 0.300], source=PRODUCTION), result(1, [1.0, 0.5, 0.4, 0.295]))
    assert select(board, 0.01)["decision"] == INCUMBENT_KEPT
    assert select(board, 0.005)["decision"] == WINNER


def test_a_winner_by_the_margin_replaces_the_incumbent():
    board = board_of(result(0, [1.0, 0.6, 0.5, 0.40], source=PRODUCTION), result(1, [1.0, 0.5, 0.4, 0.25]))
    sel = select(board, 0.01)
    assert sel["decision"] == WINNER and sel["winner"] == "t1" and sel["winner_dev_wer"] == 0.25
    assert "15.00 pts better" in sel["reason"]
    assert chosen_row(board, sel)["trial_id"] == "t1"


def test_an_incumbent_short_of_the_top_rung_is_kept_with_the_reason():
    board = board_of(result(0, [1.0, 0.6], source=PRODUCTION, error=RuntimeError("worker died")),
                     result(1, [1.0, 0.5, 0.4, 0.25]))
    sel = select(board, 0.01)
    assert sel["decision"] == INCUMBENT_KEPT and "did not reach the top rung (error)" in sel["reason"]


def test_score_orders_decoding_trials_before_blank_ones_and_blank_ones_by_loss():
    assert score(0.99, 1.0, 80.0) < score(1.0, 1.0, 1.0) < score(1.0, 1.0, 50.0) < score(1.3, 1.0, 60.0) < 10.0
    assert score(0.30, 0.10, 5.0) < score(0.30, 0.20, 1.0) < score(0.31, 0.0, 1.0)


def test_rungs_are_sized_from_the_proxy_and_the_full_budget():
    # the demo's week 2: 510 proxy train utterances, 1,140 in the pool, 15 epochs on 2 workers at batch 32
    plan = plan_rungs(SearchConfig(trials=6), TrainConfig(epochs=15, num_workers=2), proxy_train=510, pool_train=1140,
                      batch_size=32)
    assert plan.full_steps == 15 * 18 and plan.proxy_steps_per_epoch == 16
    # half of the 17,100 utterances full training sees: 17 proxy epochs
    assert plan.max_t == 17 and plan.reduction_factor == 2 and plan.grace_period == 4
    assert plan.milestones == (4, 8, 16) and plan.rungs == (4, 8, 16, 17) and plan.sized
    assert plan.warmup_scale == 1.0  # 17 × 16 steps at batch 32 on one worker > 270 per DDP rank: capped
    third = plan_rungs(SearchConfig(top_rung_fraction=0.35), TrainConfig(epochs=15, num_workers=2), proxy_train=510,
                       pool_train=1140, batch_size=32)
    assert (third.max_t, third.grace_period, third.rungs) == (12, 3, (3, 6, 12))
    assert third.warmup_scale == pytest.approx(12 * 16 / 270, abs=1e-3)
    fixed = plan_rungs(SearchConfig(max_epochs=3, grace_period=1, reduction_factor=2), TrainConfig(),
                       proxy_train=30, pool_train=40, batch_size=8)
    assert (fixed.grace_period, fixed.max_t, fixed.milestones, fixed.sized) == (1, 3, (1, 2), False)


@pytest.mark.parametrize("grace, rf, max_t", [(1, 2, 4), (2, 2, 9), (1, 3, 9), (3, 2, 12), (4, 2, 4)])
def test_rungs_match_ray_asha_brackets(grace, rf, max_t):
    from ray.tune.schedulers.async_hyperband import _Bracket

    assert asha_milestones(grace, rf, max_t) == tuple(sorted(int(m) for m, _ in _Bracket(grace, max_t, rf, 0)._rungs))


def test_optuna_hears_stopped_trials_as_pruned_and_runs_the_incumbent_first():
    import functools

    from optuna.trial import TrialState

    from pipeline.stages.search.space import SearchSpace
    from pipeline.stages.search.tuner import TopRungOptunaSearch, define_trial

    space = SearchSpace.model_validate({"params": {
        "lr": {"kind": "loguniform", "low": 1e-4, "high": 1e-2},
        "d_model": {"kind": "choice", "values": [32, 64]},
        "num_layers": {"kind": "int", "low": 1, "high": 3},
    }})
    point = {"lr": 2e-3, "d_model": 64}  # production's num_layers lies outside the space: not sampled
    searcher = TopRungOptunaSearch(space=functools.partial(define_trial, space), metric="score", mode="min",
                                   max_t=MAX_T, enqueue=[(point, {"incumbent": PRODUCTION, "point": point})])
    first = searcher.suggest("a")
    assert first == {**point, INCUMBENT_KEY: PRODUCTION}
    second = searcher.suggest("b")
    assert INCUMBENT_KEY not in second and set(second) == {"lr", "d_model", "num_layers"}
    for epoch in range(1, MAX_T + 1):
        searcher.on_trial_result("a", {"score": 0.5 - epoch / 100, "training_iteration": epoch, "epoch": epoch})
    searcher.on_trial_result("b", {"score": 0.3, "training_iteration": 1, "epoch": 1})
    searcher.on_trial_complete("a", {"score": 0.46, "epoch": MAX_T})
    searcher.on_trial_complete("b", {"score": 0.3, "epoch": 1})  # ASHA stopped it at rung 1
    states = {t.number: (t.state, t.value) for t in searcher._ot_study.trials}
    assert states[0] == (TrialState.COMPLETE, 0.46)
    assert states[1][0] == TrialState.PRUNED  # not COMPLETE with its early 0.3


def test_asha_never_stops_the_incumbent_before_the_top_rung():
    from ray.tune.schedulers import TrialScheduler

    from pipeline.stages.search.tuner import IncumbentASHA

    sched = IncumbentASHA(time_attr="epoch", metric="score", mode="min", max_t=4, grace_period=1, reduction_factor=2)
    trials = {n: SimpleNamespace(trial_id=n, config={INCUMBENT_KEY: PRODUCTION} if n == "inc" else {}) for n in ("a", "inc", "b")}
    for t in trials.values():
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, trials["a"], {"epoch": 1, "score": 0.1}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials["b"], {"epoch": 1, "score": 0.9}) == TrialScheduler.STOP
    assert sched.on_trial_result(None, trials["inc"], {"epoch": 1, "score": 0.9}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials["inc"], {"epoch": 4, "score": 0.9}) == TrialScheduler.STOP  # done


def test_the_incumbent_is_production_read_from_its_model_meta_and_kept_on_retry(tmp_path, monkeypatch):
    from support.model_factory import export_tiny

    from pipeline.run import RunContext
    from pipeline.storage import open_store
    from pipeline.tracking.models import RegisteredModel

    model = export_tiny(tmp_path / "prod.pt", "mute")
    calls = []

    def production_model(cfg):
        calls.append(cfg.registered_model)
        return RegisteredModel("asr", "7", model, {}, "week-1")

    monkeypatch.setattr("pipeline.tracking.production_model", production_model)
    ctx = RunContext(run_id="r1", config=Config(), store=open_store(str(tmp_path / "store")))
    inc = find_incumbent(ctx)
    assert (inc.source, inc.version, inc.run_id) == (PRODUCTION, "7", "week-1")
    assert inc.hparams["encoder"] == "transformer" and inc.hparams["d_model"] == 32 and inc.hparams["n_mels"] == 40
    assert inc.hparams["win_ms"] == 25.0 and inc.hparams["hop_ms"] == 10.0 and "epochs" not in inc.hparams
    # a retried search compares against the incumbent its first attempt recorded, whatever production is now
    monkeypatch.setattr("pipeline.tracking.production_model", lambda cfg: None)
    again = find_incumbent(ctx)
    assert again == inc and len(calls) == 1
    # a cold start: the configured default
    cold = find_incumbent(RunContext(run_id="r2", config=Config(), store=ctx.store))
    assert cold.source == CONFIG_DEFAULT and cold.hparams["d_model"] == Config().model.d_model


def test_production_meta_overrides_the_default_and_a_trial_lays_its_point_on_it():
    config = Config()
    meta = {"model": {"d_model": 96, "num_layers": 3}, "train": {"lr": 5e-4, "epochs": 99, "batch_size": 16},
            "features": {"n_mels": 64, "win_ms": 25.0, "hop_ms": 12.5}, "augment": {"vtlp": 0.1, "copies": 3}}
    hp = hparams_from_meta(meta, config)
    assert (hp["d_model"], hp["num_layers"], hp["lr"], hp["batch_size"], hp["n_mels"], hp["hop_ms"], hp["vtlp"]) == \
        (96, 3, 5e-4, 16, 64, 12.5, 0.1)
    assert "epochs" not in hp and "copies" not in hp  # operational settings stay the run's
    assert trial_hparams({"lr": 1e-3, INCUMBENT_KEY: PRODUCTION}, hp)["lr"] == 1e-3
    json.dumps(hp)  # recordable as is
