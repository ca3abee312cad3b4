"""Hyperparameter search: Ray Tune ASHA + Optuna TPE on the proxy set.

Stage ``search``: every trial runs the one training loop (:func:`pipeline.asr.training.train_model`)
on the run's proxy train split and reports dev WER each epoch through ``tune.report``
with a checkpoint; ``ASHAScheduler`` (time attribute ``epoch``) stops the weak trials
early; ``ConcurrencyLimiter(OptunaSearch(...))`` proposes configurations with a seeded
TPE sampler. A preempted trial restarts from its last checkpoint (``tune.get_checkpoint``,
``FailureConfig(max_failures)``); a retried stage restores the experiment from the
run's work area with ``Tuner.restore`` instead of starting over.

Warm start: the production configuration (when given) and the best trials of earlier
runs (``state/search/history.jsonl``) are evaluated first (``points_to_evaluate``).

Outputs in ``runs/{run_id}/search/``: ``best_config.json``, ``leaderboard.json``,
``importance.json`` (Optuna fANOVA over completed trials), ``curves.png`` and
``importance.png``; everything is logged to MLflow as one parent run with a nested run
per trial. Front-end choices in the space (n_mels, win_ms, hop_ms) each get their own
feature cache, built before the trials start.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config, FeatureConfig
from pipeline.run import RunContext
from pipeline.stages.search.space import FRONTEND_PARAMS, SearchSpace, filter_point, load_space, optuna_distributions, suggest

STAGE = "search"
STATE_FILE = "state.pt"
DIVERGED_WER = 10.0  # reported for a diverged trial: worse than any real WER
HISTORY_KEY = ("search", "history.jsonl")


def _frontend_key(fe: FeatureConfig) -> str:
    return f"{fe.n_mels}/{fe.win_ms:g}/{fe.hop_ms:g}"


def _trial(params: dict[str, Any], data: dict[str, Any]) -> None:
    """One Tune trial (a function trainable): train on the proxy, report dev WER per epoch."""
    import torch
    from ray import tune

    from pipeline.asr.training import TrainingDiverged, resolve_augment, resolve_hparams, train_model
    from pipeline.data.dataset import IndexedFeatures
    from pipeline.data.features import FeatureStore
    from pipeline.storage import open_store

    torch.set_num_threads(max(1, int(data["threads"])))
    config = Config.model_validate(data["config"])
    fe = config.features.model_copy(update={k: params[k] for k in FRONTEND_PARAMS if k in params})
    part = data["frontends"][_frontend_key(fe)]
    fs = FeatureStore(open_store(data["root"], config.storage), part["index"])
    train_set, dev_set = IndexedFeatures(fs, part["train"]), IndexedFeatures(fs, part["dev"])
    model_cfg, train_cfg = resolve_hparams(config, {k: v for k, v in params.items() if k not in FRONTEND_PARAMS})
    train_cfg = train_cfg.model_copy(update={"seed": int(data["seed"])})

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    last_epoch = int(resume["epoch"]) if resume else 0
    resumed_from = last_epoch  # > 0: this attempt continues a preempted one from its checkpoint

    def report(rep, state):
        nonlocal last_epoch
        last_epoch = rep.epoch
        metrics = {**rep.metrics(), "diverged": False, "resumed_from": resumed_from, "pid": os.getpid()}
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        train_model(
            model_cfg, train_cfg, train_set, dev_set,
            n_mels=fs.n_mels, feature_mean=fs.mean, feature_var=fs.var,
            resume=resume, report=report, max_epochs=int(data["max_epochs"]), augment=resolve_augment(config, params),
        )
    except TrainingDiverged as exc:
        tune.report({"epoch": last_epoch + 1, "dev_wer": DIVERGED_WER, "dev_cer": DIVERGED_WER,
                     "dev_loss": 1e9, "diverged": True, "status_message": str(exc)})


def _proxy_ids(ctx: RunContext) -> tuple[list[str], list[str]]:
    if not ctx.is_complete("proxy"):
        raise RuntimeError(f"run {ctx.run_id!r} has no proxy sample yet: run the proxy stage first")
    out = []
    for name in ("train", "dev"):
        text = ctx.store.get_text(ctx.stage_key("proxy", f"{name}.jsonl"))
        out.append([json.loads(line)["utt_id"] for line in text.splitlines() if line.strip()])
    return out[0], out[1]


def _prepare_frontends(ctx: RunContext, space: SearchSpace, progress: bool) -> dict[str, Any]:
    from pipeline.asr.extraction import extract_pool_features
    from pipeline.data.features import load_feature_index

    train_ids, dev_ids = _proxy_ids(ctx)
    parts: dict[str, Any] = {}
    for fe in space.frontends(ctx.config.features):
        stage = extract_pool_features(ctx, fe, progress=progress)["stage"]
        index = load_feature_index(ctx.store, ctx.run_id, stage=stage)
        pos = {u["utt_id"]: i for i, u in enumerate(index["utterances"])}
        missing = [u for u in train_ids + dev_ids if u not in pos]
        if missing:
            raise RuntimeError(f"{len(missing)} proxy utterances have no features (e.g. {missing[0]!r}): re-run features")
        parts[_frontend_key(fe)] = {"index": index, "train": [pos[u] for u in train_ids], "dev": [pos[u] for u in dev_ids]}
    return parts


def read_history(ctx: RunContext) -> list[dict[str, Any]]:
    key = ctx.state_key(*HISTORY_KEY)
    if not ctx.store.exists(key):
        return []
    return [json.loads(line) for line in ctx.store.get_text(key).splitlines() if line.strip()]


def warm_start_points(
    ctx: RunContext, space: SearchSpace, production_hparams: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Production's configuration first, then the best trials of earlier runs, as valid points."""
    points: list[dict[str, Any]] = []
    sources: list[str] = []
    if production_hparams:
        points.append(filter_point(space, production_hparams))
        sources.append("production")
    else:  # cold start: the configured default stands in for production's configuration
        cfg = ctx.config
        points.append(filter_point(space, {**cfg.features.model_dump(), **cfg.model.model_dump(), **cfg.train.model_dump(),
                                              "vtlp": cfg.augment.vtlp}))
        sources.append("config-default")
    earlier = [
        (t["best_dev_wer"], entry["run_id"], t["config"])
        for entry in read_history(ctx)
        if entry.get("run_id") != ctx.run_id
        for t in entry.get("top", [])
    ]
    for wer, run_id, cfg in sorted(earlier, key=lambda x: x[0]):
        if len(points) >= ctx.config.search.warm_start_top_k + 1:
            break
        point = filter_point(space, cfg)
        if point and point not in points:
            points.append(point)
            sources.append(f"run:{run_id} (dev WER {wer:.3f})")
    return [p for p in points if p], sources


def _build_tuner(ctx: RunContext, space: SearchSpace, data: dict[str, Any], points: list[dict[str, Any]], trials: int, budget_s: float | None):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.ray import ray_storage

    s = ctx.config.search
    trainable = tune.with_resources(
        tune.with_parameters(_trial, data=data),
        {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial},
    )
    storage_path, storage_fs = ray_storage(ctx, STAGE)
    path = os.path.join(storage_path, "tune")
    restorable = tune.Tuner.can_restore(path, storage_filesystem=storage_fs)
    if restorable:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=storage_fs), True
    if s.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(2, trials // 3))
    searcher = OptunaSearch(
        space=functools.partial(suggest, space),
        metric=s.metric,
        mode="min",
        points_to_evaluate=points or None,
        sampler=sampler,
    )
    if s.scheduler == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        scheduler = FIFOScheduler()
    else:
        scheduler = ASHAScheduler(
            time_attr="epoch", max_t=s.max_epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor
        )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode="min",
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=scheduler,
            num_samples=trials,
            time_budget_s=budget_s,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )
    return tuner, False


def _curve(df, column: str) -> list[tuple[int, float]]:
    if df is None or column not in df or "epoch" not in df:
        return []
    seen: dict[int, float] = {}
    for epoch, value in zip(df["epoch"], df[column]):
        if not (isinstance(epoch, float) and math.isnan(epoch)):
            seen[int(epoch)] = float(value)
    return sorted(seen.items())


def _leaderboard(results, max_epochs: int, metric: str = "dev_wer") -> list[dict[str, Any]]:
    rows = []
    for r in results:
        df = r.metrics_dataframe
        curve = _curve(df, "dev_wer")
        metric_curve = _curve(df, metric)
        metrics = r.metrics or {}
        diverged = bool(metrics.get("diverged"))
        epochs_run = curve[-1][0] if curve else 0
        if r.error is not None:
            status = "error"
        elif diverged:
            status = "diverged"
        elif epochs_run >= max_epochs:
            status = "completed"
        else:
            status = "asha_stopped"
        wers = [w for _, w in curve if not diverged or w < DIVERGED_WER]
        values = [v for _, v in metric_curve if not diverged]
        tag = str(metrics.get("experiment_tag", ""))
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or (Path(r.path).name if r.path else None),
                "trial_number": int(tag.split("_", 1)[0]) if tag.split("_", 1)[0].isdigit() else None,
                "config": dict(r.config or {}),
                "best_dev_wer": min(wers) if wers else None,
                "metric": metric,
                "best_metric": min(values) if values else None,
                "last_dev_wer": curve[-1][1] if curve else None,
                "epochs": epochs_run,
                "status": status,
                "stop_reason": status if status != "error" else f"error: {str(r.error).splitlines()[0][:200]}",
                "curve": curve,
                "metric_curve": metric_curve,
                "resumed_from": sorted({int(v) for v in df["resumed_from"] if v == v and v > 0}) if df is not None and "resumed_from" in df else [],
                "trial_seconds": float(sum(df["seconds"])) if df is not None and "seconds" in df else 0.0,
            }
        )
    rank = {"completed": 0, "asha_stopped": 1, "diverged": 2, "error": 3}
    rows.sort(key=lambda x: (x["best_metric"] is None, x["best_metric"] if x["best_metric"] is not None else 0, rank[x["status"]]))
    return rows


def _importance(space: SearchSpace, board: list[dict[str, Any]]) -> dict[str, float]:
    import optuna

    done = [r for r in board if r["status"] in ("completed", "asha_stopped") and r["best_metric"] is not None]
    if len(done) < 3:
        return {}
    dists = optuna_distributions(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for r in done:
        params = {k: v for k, v in r["config"].items() if k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params}, value=r["best_metric"]))
    try:
        imp = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):
        return {}
    return {k: round(float(v), 4) for k, v in imp.items()}


def _plots(board: list[dict[str, Any]], importance: dict[str, float], out: Path, config: Config) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = config.search
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    metric = s.metric
    cap = 1.5 if metric != "dev_loss" else float("inf")
    for r in board:
        if r["metric_curve"]:
            e, w = zip(*[(e, min(w, cap)) for e, w in r["metric_curve"]])
            ax.plot(e, w, marker="o", ms=3, alpha=0.8, label=f"#{r['trial_number']} {r['trial_id']} ({r['status']})")
    rung = s.grace_period
    while rung < s.max_epochs:
        ax.axvline(rung, color="grey", ls=":", lw=1)
        rung *= s.reduction_factor
    ax.set_xlabel("epoch (dotted: ASHA rungs)")
    ax.set_ylabel(f"{metric} (proxy dev split)")
    ax.set_title(f"Search: {metric} per trial (ASHA stops the weak ones at the rungs)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if importance:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(importance) + 1))
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names], color="#3b7dd8")
        ax.set_xlabel("fANOVA importance")
        fig.tight_layout()
        paths.append(out / "importance.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _log_mlflow(ctx: RunContext, board: list[dict[str, Any]], best: dict[str, Any], files: list[Path], summary: dict[str, Any]) -> str:
    import mlflow

    from pipeline.tracking import SEARCH_EXPERIMENT, quiet_mlflow, setup_mlflow

    quiet_mlflow()
    exp = setup_mlflow(ctx.config.mlflow, SEARCH_EXPERIMENT)
    client = mlflow.MlflowClient()
    # a retried stage replaces what an earlier attempt logged for this run
    for old in client.search_runs([exp], filter_string=f"tags.asr_run_id = '{ctx.run_id}'"):
        client.delete_run(old.info.run_id)
    with mlflow.start_run(experiment_id=exp, run_name=f"search {ctx.run_id}", tags={"asr_run_id": ctx.run_id, "asr_kind": "search"}) as parent:
        mlflow.log_params({f"best.{k}": v for k, v in best.items()})
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
        for f in files:
            mlflow.log_artifact(str(f))
        for r in board:
            with mlflow.start_run(experiment_id=exp, run_name=r["trial_id"], nested=True,
                                  tags={"asr_run_id": ctx.run_id, "asr_kind": "trial", "status": r["status"], "stop_reason": r["stop_reason"]}):
                mlflow.log_params(r["config"])
                for epoch, wer in r["curve"]:
                    if math.isfinite(wer):
                        mlflow.log_metric("dev_wer", wer, step=epoch)
        return parent.info.run_id


def search(
    ctx: RunContext,
    *,
    trials: int | None = None,
    budget_s: float | None = None,
    production_hparams: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage ``search``: ASHA + TPE on the proxy; returns the best configuration and the leaderboard's head."""
    return ctx.run_stage(STAGE, lambda: _search(ctx, trials, budget_s, production_hparams, progress))


def _search(ctx: RunContext, trials: int | None, budget_s: float | None, production_hparams: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    from pipeline.ray import ensure_ray

    s = ctx.config.search
    trials = trials or s.trials
    budget_s = budget_s if budget_s is not None else s.budget_s
    space = load_space(s.space_path())
    data = {
        "config": ctx.config.model_dump(mode="json"),
        "root": ctx.store.root,
        "frontends": _prepare_frontends(ctx, space, progress),
        "max_epochs": s.max_epochs,
        "seed": s.seed,
        "threads": max(1, int(s.cpus_per_trial)),
    }
    points, sources = warm_start_points(ctx, space, production_hparams)
    ensure_ray(ctx.config)
    tuner, restored = _build_tuner(ctx, space, data, points, trials, budget_s)
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    results = [grid[i] for i in range(len(grid))]
    board = _leaderboard(results, s.max_epochs, s.metric)
    ok = [r for r in board if r["best_metric"] is not None and r["status"] in ("completed", "asha_stopped")]
    if not ok:
        reasons = sorted({r["stop_reason"] for r in board})
        raise RuntimeError(f"search produced no usable trial ({len(board)} trials: {reasons})")
    best = ok[0]["config"]
    importance = _importance(space, board)
    out = ctx.stage_prefix(STAGE)
    trial_epochs = sum(r["epochs"] for r in board)
    trial_seconds = sum(r["trial_seconds"] for r in board)
    summary = {
        "trials": len(board),
        "restored": restored,
        "warm_start": sources,
        "best_dev_wer": ok[0]["best_dev_wer"],
        "metric": s.metric,
        "best_metric": ok[0]["best_metric"],
        "best_trial": ok[0]["trial_id"],
        "statuses": {k: sum(1 for r in board if r["status"] == k) for k in ("completed", "asha_stopped", "diverged", "error")},
        "trial_epochs": trial_epochs,
        "full_budget_epochs": len(board) * s.max_epochs,
        "wall_s": round(wall, 2),
        "trial_compute_s": round(trial_seconds, 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        files = {
            "best_config.json": json.dumps(best, indent=2, sort_keys=True),
            "leaderboard.json": json.dumps(board, indent=2),
            "importance.json": json.dumps(importance, indent=2),
        }
        for name, text in files.items():
            (tmpd / name).write_text(text)
        pngs = _plots(board, importance, tmpd, ctx.config)
        all_files = [tmpd / n for n in files] + pngs
        summary["mlflow_run_id"] = _log_mlflow(ctx, board, best, all_files, summary)
        for f in all_files:
            ctx.store.upload_file(f"{out}/{f.name}", f)
    _append_history(ctx, board)
    summary["best_config"] = best
    summary["leaderboard_head"] = [
        {k: r[k] for k in ("trial_id", "best_dev_wer", "best_metric", "epochs", "status")} for r in board[:5]
    ]
    summary["best_config_uri"] = ctx.store.uri(f"{out}/best_config.json")
    return summary


def _append_history(ctx: RunContext, board: list[dict[str, Any]]) -> None:
    key = ctx.state_key(*HISTORY_KEY)
    entries = [e for e in read_history(ctx) if e.get("run_id") != ctx.run_id]
    top = [{"config": r["config"], "best_dev_wer": r["best_dev_wer"]} for r in board
           if r["status"] == "completed" and r["best_dev_wer"] is not None][:5]
    entries.append({"run_id": ctx.run_id, "top": top})
    ctx.store.put_text(key, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def load_best_config(ctx: RunContext) -> dict[str, Any] | None:
    key = ctx.stage_key(STAGE, "best_config.json")
    return json.loads(ctx.store.get_text(key)) if ctx.store.exists(key) else None
