"""Hyperparameter search: the incumbent against Ray Tune ASHA + Optuna TPE on the proxy set.

Stage ``search``. Trial 0 is always the incumbent — production's configuration, read from
the registered production model (:mod:`~pipeline.stages.search.incumbent`), or the configured
default at a cold start — trained like every other trial; the best trials of earlier runs
(``state/search/history.jsonl``) come next, then Optuna's TPE. Every trial runs the one
training loop (:func:`pipeline.asr.training.train_model`) on the run's proxy train split and
reports every epoch; ASHA stops the weak ones at rungs sized from the proxy and the
full-training budget (:mod:`~pipeline.stages.search.rungs`), never the incumbent, and Optuna
hears of stopped trials as pruned (:mod:`~pipeline.stages.search.tuner`). A preempted trial
restarts from its last rung's checkpoint (``FailureConfig(max_failures)``); a retried stage
restores the experiment (``Tuner.restore``) and the incumbent it recorded.

Selection (:mod:`~pipeline.stages.search.selection`): only trials that reached the top rung
can win, ranked by dev WER there (CER breaks ties); the winner replaces the incumbent only if
it is ``search.min_improvement`` better, otherwise full training gets the incumbent's
configuration. ``search.fidelity_top_k >= 2`` adds the proxy-fidelity check
(:mod:`~pipeline.stages.search.fidelity`).

Outputs in ``runs/{run_id}/search/``: ``best_config.json`` (the hyperparameters full training
uses, with ``_selection``: the decision and its reason), ``leaderboard.json``,
``importance.json``, ``curves.png``, ``importance.png`` and ``chosen_weights.pt`` (the selected
trial's weights at the top rung, which ``train.init: search`` starts full training from); MLflow gets one parent run with a
nested run per trial. Front-end choices (n_mels, win_ms, hop_ms) each get their own feature
cache, built before the trials start.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import FeatureConfig
from pipeline.run import SEARCH_WEIGHTS, RunContext
from pipeline.stages.search.fidelity import fidelity_alert, measure_fidelity
from pipeline.stages.search.incumbent import Incumbent, find_incumbent
from pipeline.stages.search.report import importance, log_mlflow, plots
from pipeline.stages.search.rungs import RungPlan, plan_rungs
from pipeline.stages.search.selection import WINNER, chosen_row, leaderboard, select, trial_id_of
from pipeline.stages.search.space import FRONTEND_PARAMS, SearchSpace, filter_point, load_space
from pipeline.stages.search.trial import frontend_key, trial_hparams

log = logging.getLogger(__name__)

STAGE = "search"
HISTORY_KEY = ("search", "history.jsonl")


def _proxy_ids(ctx: RunContext) -> tuple[list[str], list[str]]:
    if not ctx.is_complete("proxy"):
        raise RuntimeError(f"run {ctx.run_id!r} has no proxy sample yet: run the proxy stage first")
    out = []
    for name in ("train", "dev"):
        text = ctx.store.get_text(ctx.stage_key("proxy", f"{name}.jsonl"))
        out.append([json.loads(line)["utt_id"] for line in text.splitlines() if line.strip()])
    return out[0], out[1]


def _frontends(ctx: RunContext, space: SearchSpace, incumbent: Incumbent) -> list[FeatureConfig]:
    """The space's front ends and the incumbent's (production's may lie outside the space)."""
    own = ctx.config.features.model_copy(update={k: incumbent.hparams[k] for k in FRONTEND_PARAMS})
    out = space.frontends(ctx.config.features)
    return out + [own] if own not in out else out


def _prepare_frontends(ctx: RunContext, space: SearchSpace, incumbent: Incumbent, progress: bool) -> dict[str, Any]:
    """Per front end: the pool's feature index, the proxy's train/dev positions in it, and the
    train stage's split of the whole pool (for the rungs and the fidelity check)."""
    from pipeline.asr.extraction import extract_pool_features
    from pipeline.data.dataset import split_by_utterance
    from pipeline.data.features import load_feature_index

    train_ids, dev_ids = _proxy_ids(ctx)
    t = ctx.config.train
    parts: dict[str, Any] = {}
    for fe in _frontends(ctx, space, incumbent):
        stage = extract_pool_features(ctx, fe, progress=progress)["stage"]
        index = load_feature_index(ctx.store, ctx.run_id, stage=stage)
        pos = {u["utt_id"]: i for i, u in enumerate(index["utterances"])}
        missing = [u for u in train_ids + dev_ids if u not in pos]
        if missing:
            raise RuntimeError(f"{len(missing)} proxy utterances have no features (e.g. {missing[0]!r}): re-run features")
        full_train, full_dev = split_by_utterance(index["utterances"], t.dev_fraction, t.seed)
        parts[frontend_key(fe.n_mels, fe.win_ms, fe.hop_ms)] = {
            "index": index, "proxy_train": [pos[u] for u in train_ids], "proxy_dev": [pos[u] for u in dev_ids],
            "full_train": full_train, "full_dev": full_dev,
        }
    return parts


def read_history(ctx: RunContext) -> list[dict[str, Any]]:
    key = ctx.state_key(*HISTORY_KEY)
    if not ctx.store.exists(key):
        return []
    return [json.loads(line) for line in ctx.store.get_text(key).splitlines() if line.strip()]


def warm_start_points(ctx: RunContext, space: SearchSpace, incumbent: Incumbent) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(point, Optuna user_attrs) to enqueue: the incumbent first, then earlier runs' best trials."""
    first = incumbent.point(space)
    points = [(first, {"incumbent": incumbent.source, "point": first})]
    earlier = [
        (t["best_dev_wer"], entry["run_id"], t["config"])
        for entry in read_history(ctx)
        if entry.get("run_id") != ctx.run_id
        for t in entry.get("top", [])
    ]
    seen = [first]
    for wer, run_id, cfg in sorted(earlier, key=lambda x: x[0]):
        if len(points) >= ctx.config.search.warm_start_top_k + 1:
            break
        point = filter_point(space, cfg)
        if point and point not in seen:
            seen.append(point)
            points.append((point, {"warm_start": f"run:{run_id} (dev WER {wer:.3f})"}))
    return points


def search(
    ctx: RunContext,
    *,
    trials: int | None = None,
    budget_s: float | None = None,
    production_hparams: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage ``search``: the incumbent and ASHA + TPE on the proxy; returns the selected configuration,
    why it was selected, and the leaderboard's head. ``production_hparams`` overrides the registry."""
    return ctx.run_stage(STAGE, lambda: _search(ctx, trials, budget_s, production_hparams, progress))


def _experiment_data(ctx: RunContext, incumbent: Incumbent, parts: dict[str, Any], plan: RungPlan) -> dict[str, Any]:
    """What every trial receives (through Ray's object store, once)."""
    s = ctx.config.search
    return {
        "config": ctx.config.model_dump(mode="json"),
        "root": ctx.store.root,
        "frontends": parts,
        "base": incumbent.hparams,
        "max_epochs": plan.max_t,
        "warmup_scale": plan.warmup_scale,
        "checkpoint_epochs": list(plan.rungs),
        "seed": s.seed,
        "threads": max(1, int(s.cpus_per_trial)),
    }


def _setup(ctx: RunContext, production_hparams: dict[str, Any] | None,
           progress: bool) -> tuple[SearchSpace, Incumbent, RungPlan, dict[str, Any]]:
    """The space, the incumbent, the rungs and what every trial receives."""
    s = ctx.config.search
    space = load_space(s.space_path())
    incumbent = find_incumbent(ctx, production_hparams)
    parts = _prepare_frontends(ctx, space, incumbent, progress)
    own = parts[frontend_key(*(incumbent.hparams[k] for k in FRONTEND_PARAMS))]
    plan = plan_rungs(s, ctx.config.train, proxy_train=len(own["proxy_train"]), pool_train=len(own["full_train"]),
                      batch_size=int(incumbent.hparams["batch_size"]))
    return space, incumbent, plan, _experiment_data(ctx, incumbent, parts, plan)


def check_fidelity(ctx: RunContext, k: int | None = None, known: dict[str, float] | None = None) -> dict[str, Any]:
    """The proxy-fidelity check of this run's finished search, on demand (the benchmark calls it):
    its top-k configurations trained on the full pool (``known``: trial id -> full-training dev WER
    already measured); it changes none of the stage's outputs."""
    from pipeline.ray import ensure_ray

    if not ctx.is_complete(STAGE):
        raise RuntimeError(f"run {ctx.run_id!r} has no finished search: run the search stage first")
    s = ctx.config.search
    _, _, _, data = _setup(ctx, None, False)
    board = json.loads(ctx.store.get_text(ctx.stage_key(STAGE, "leaderboard.json")))
    ensure_ray(ctx.config)
    return measure_fidelity(ctx, data, board, k or max(2, s.fidelity_top_k), s.fidelity_floor, known)


def _search(ctx: RunContext, trials: int | None, budget_s: float | None, production_hparams: dict[str, Any] | None,
            progress: bool) -> dict[str, Any]:
    from pipeline.ray import ensure_ray
    from pipeline.stages.search.tuner import build_tuner, startup_trials

    s = ctx.config.search
    trials = trials or s.trials
    budget_s = budget_s if budget_s is not None else s.budget_s
    space, incumbent, plan, data = _setup(ctx, production_hparams, progress)
    enqueue = warm_start_points(ctx, space, incumbent)
    ensure_ray(ctx.config)
    tuner, restored = build_tuner(ctx, space, data, plan, enqueue, trials, budget_s, progress)
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    board = leaderboard([grid[i] for i in range(len(grid))], plan.max_t, s.metric)
    if not any(r["best_metric"] is not None and r["status"] in ("completed", "asha_stopped") for r in board):
        reasons = sorted({r["stop_reason"] for r in board})
        raise RuntimeError(f"search produced no usable trial ({len(board)} trials: {reasons})")
    selection = select(board, s.min_improvement)
    chosen = chosen_row(board, selection)
    best = trial_hparams(chosen["config"], incumbent.hparams) if chosen else dict(incumbent.hparams)
    summary = _summary(ctx, board, incumbent, plan, selection, chosen, restored, wall)
    summary["warm_start"] = [incumbent.source] + [attrs["warm_start"] for _, attrs in enqueue[1:]]
    summary["n_startup_trials"] = startup_trials(s, trials) if s.sampler == "tpe" else None
    if s.fidelity_top_k >= 2:
        summary["fidelity"] = measure_fidelity(ctx, data, board, s.fidelity_top_k, s.fidelity_floor)
        alert = fidelity_alert(summary["fidelity"])
        if alert:
            summary["alerts"].append(alert)
    _write_outputs(ctx, space, plan, board, best, selection, summary)
    summary["chosen_weights"] = _save_chosen_weights(ctx, grid, chosen, plan.max_t)
    _append_history(ctx, board)
    return summary


def _save_chosen_weights(ctx: RunContext, grid, chosen: dict[str, Any] | None, max_t: int) -> dict[str, Any]:
    """The selected trial's top-rung weights as ``search/chosen_weights.pt``, for ``train.init: search``."""
    import torch

    from pipeline.stages.search.trial import STATE_FILE

    if chosen is None or chosen.get("top_rung") is None:
        return {"saved": False, "reason": "the selected configuration has no top-rung checkpoint"}
    result = next((r for r in grid if trial_id_of(r) == chosen["trial_id"]), None)
    checkpoint = getattr(result, "checkpoint", None)
    if checkpoint is None:
        return {"saved": False, "reason": f"trial {chosen['trial_id']} left no checkpoint"}
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    if int(state.get("epoch", -1)) != max_t:
        return {"saved": False, "reason": f"trial {chosen['trial_id']}'s last checkpoint is epoch {state.get('epoch')}, "
                                          f"not the top rung ({max_t})"}
    keep = {"model": state["model"], "model_cfg": state["model_cfg"], "n_mels": state["n_mels"],
            "epoch": state["epoch"], "trial_id": chosen["trial_id"], "dev_wer": chosen["top_rung"]["dev_wer"]}
    key = ctx.stage_key(*SEARCH_WEIGHTS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SEARCH_WEIGHTS[1]
        torch.save(keep, path)
        ctx.store.upload_file(key, path)
    return {"saved": True, "trial_id": chosen["trial_id"], "epoch": state["epoch"], "uri": ctx.store.uri(key)}


def _summary(ctx: RunContext, board: list[dict[str, Any]], incumbent: Incumbent, plan: RungPlan,
             selection: dict[str, Any], chosen: dict[str, Any] | None, restored: bool, wall: float) -> dict[str, Any]:
    s = ctx.config.search
    inc_row = next((r for r in board if r["incumbent"]), None)
    inc_top = (inc_row or {}).get("top_rung") or {}
    top = [r for r in board if r["top_rung"] is not None]
    trial_seconds = sum(r["trial_seconds"] for r in board)
    summary: dict[str, Any] = {
        "trials": len(board),
        "restored": restored,
        "incumbent": {**incumbent.describe(), "trial_id": inc_row["trial_id"] if inc_row else None,
                      "top_rung_dev_wer": inc_top.get("dev_wer")},
        "selection": selection,
        "rungs": plan.describe(),
        "best_trial": chosen["trial_id"] if chosen else None,
        "best_dev_wer": (chosen["top_rung"] or {}).get("dev_wer") if chosen else None,
        "metric": s.metric,
        "best_metric": chosen["best_metric"] if chosen else None,
        "statuses": {k: sum(1 for r in board if r["status"] == k) for k in ("completed", "asha_stopped", "diverged", "error")},
        "top_rung": {"epoch": plan.max_t, "trials": len(top), "decoding": sum(1 for r in top if r["top_rung"]["dev_wer"] < 1)},
        "trial_epochs": sum(r["epochs"] for r in board),
        "full_budget_epochs": len(board) * plan.max_t,
        "wall_s": round(wall, 2),
        "trial_compute_s": round(trial_seconds, 2),
        "overhead_per_slot": round(wall * s.max_concurrent / trial_seconds, 3) if trial_seconds else None,
        "alerts": [],
    }
    if inc_top.get("dev_wer", 0.0) >= 1:
        message = (f"the incumbent still decodes nothing at the top rung (epoch {plan.max_t}, dev WER "
                   f"{inc_top['dev_wer']:.3f}): the rungs are too short to rank; raise search.top_rung_fraction")
        log.warning(message)
        summary["alerts"].append({"kind": "rungs-too-short", "severity": "warning", "message": message})
    return summary


def _write_outputs(ctx: RunContext, space: SearchSpace, plan: RungPlan, board: list[dict[str, Any]],
                   best: dict[str, Any], selection: dict[str, Any], summary: dict[str, Any]) -> None:
    out = ctx.stage_prefix(STAGE)
    imp = importance(space, board)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        files = {
            "best_config.json": json.dumps({**best, "_selection": selection}, indent=2, sort_keys=True),
            "leaderboard.json": json.dumps(board, indent=2),
            "importance.json": json.dumps(imp, indent=2),
        }
        for name, text in files.items():
            (tmpd / name).write_text(text)
        pngs = plots(board, imp, tmpd, ctx.config.search.metric, plan)
        all_files = [tmpd / n for n in files] + pngs
        summary["mlflow_run_id"] = log_mlflow(ctx, board, best, all_files, summary)
        for f in all_files:
            ctx.store.upload_file(f"{out}/{f.name}", f)
    summary["best_config"] = best
    summary["leaderboard_head"] = [
        {"trial_id": r["trial_id"], "source": r["source"], "top_rung_dev_wer": (r["top_rung"] or {}).get("dev_wer"),
         "best_dev_wer": r["best_dev_wer"], "best_metric": r["best_metric"], "epochs": r["epochs"], "status": r["status"]}
        for r in board[:5]
    ]
    summary["best_config_uri"] = ctx.store.uri(f"{out}/best_config.json")
    summary["decision"] = selection["decision"]
    summary["winner_selected"] = selection["decision"] == WINNER


def _append_history(ctx: RunContext, board: list[dict[str, Any]]) -> None:
    key = ctx.state_key(*HISTORY_KEY)
    entries = [e for e in read_history(ctx) if e.get("run_id") != ctx.run_id]
    top = [{"config": r["config"], "best_dev_wer": r["top_rung"]["dev_wer"]} for r in board if r["top_rung"]][:5]
    entries.append({"run_id": ctx.run_id, "top": top})
    ctx.store.put_text(key, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def load_best_config(ctx: RunContext) -> dict[str, Any] | None:
    """The hyperparameters the search selected (with its ``_selection`` note, which training ignores)."""
    key = ctx.stage_key(STAGE, "best_config.json")
    return json.loads(ctx.store.get_text(key)) if ctx.store.exists(key) else None
