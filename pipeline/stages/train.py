"""Full training of one configuration through Ray Train's ``TorchTrainer`` (DDP).

The stage ``train`` trains on the run's whole feature set (the training pool minus a
seeded dev split, ``train.dev_fraction``), with ``train.num_workers`` DDP workers (gloo
on CPU, NCCL on GPU), ``FailureConfig(max_failures)`` so a lost worker restarts from the
last checkpoint (a hung one too, after ``train.hang_timeout_s``: Ray Train's worker health
check and the collectives' timeout), and rank 0 alone checkpointing. The experiment lives
in the run's work area under a fixed name, so a retried stage (the driver died) resumes from its last
checkpoint: Ray Train V2 picks up a run whose (storage_path, name) it finds. Restarts are
recorded in ``metrics.json`` as ``resumed_from`` (the epochs training continued from). The
controller takes up a checkpoint when it next polls the workers (``train.report_poll_s``), so a
lost node costs the epoch in flight, plus any checkpoint written less than that long before it.
The best epoch by dev WER is exported (``runs/{run_id}/train/model.pt``) with
``metrics.json`` and ``history.json``.

``train.init: production`` starts from production's weights (the registered production
model's TorchScript holds them: ``ServingModel.model``) when the architecture matches (same
model shapes and n_mels); otherwise, or at a cold start, training starts from scratch.
``train.init: search`` starts from the run's search: the selected trial's weights at the top
rung (``search/chosen_weights.pt``), so the compute the search spent on that configuration is
kept; without a search output, or when the architecture differs, from scratch. Those weights saw
only the proxy's train split, which may hold utterances of full training's dev split: the dev
WER that picks the best epoch can then be slightly optimistic (the golden set is untouched).
``metrics.json`` and the model's ``meta.json`` record ``init`` with the reason. A retried
stage resumes from its own checkpoint either way. Keys of ``hparams`` that start with ``_``
(e.g. the search's ``_selection`` note in ``best_config.json``) are notes, not settings.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import AugmentConfig, ModelConfig, TrainConfig
from pipeline.run import RunContext

STAGE = "train"
STATE_FILE = "state.pt"
# ModelConfig fields that shape the weights (dropout and SpecAugment do not)
ARCH_KEYS = ("encoder", "num_layers", "d_model", "attention_heads", "ffn_mult", "conv_kernel", "subsample_channels")
WORKER_HEALTH_CHECK_TIMEOUT_ENV = "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: load features, call the one training loop."""
    import ray.train

    from pipeline.asr.training import train_model
    from pipeline.config import Config
    from pipeline.data.dataset import IndexedFeatures
    from pipeline.data.features import FeatureStore
    from pipeline.progress import Progress
    from pipeline.storage import open_store

    torch.set_num_threads(int(loop_config.get("threads", 1)))
    config = Config.model_validate(loop_config["config"])
    store = open_store(loop_config["root"], config.storage)
    fs = FeatureStore(store, loop_config["index"])
    train_set = IndexedFeatures(fs, loop_config["train_idx"])
    dev_set = IndexedFeatures(fs, loop_config["dev_idx"])

    checkpoint = ray.train.get_checkpoint()
    resume = _load_state(checkpoint) if checkpoint is not None else None

    resumed_from = int(resume["epoch"]) if resume is not None else 0  # > 0: a restart after a lost worker or driver
    train_cfg = TrainConfig.model_validate(loop_config["train"])
    rank0 = ray.train.get_context().get_world_rank() == 0
    bar = Progress("train", train_cfg.epochs, "epoch", enabled=False, path=loop_config.get("progress_file") if rank0 else None)
    bar.update(resumed_from)

    def report(rep, state):
        metrics = {**rep.metrics(), "resumed_from": resumed_from, "pid": os.getpid()}
        bar.update(1, dev_wer=f"{metrics['dev_wer']:.3f}")
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    train_model(
        ModelConfig.model_validate(loop_config["model"]),
        train_cfg,
        train_set,
        dev_set,
        n_mels=fs.n_mels,
        feature_mean=fs.mean,
        feature_var=fs.var,
        resume=resume,
        report=report,
        augment=AugmentConfig.model_validate(loop_config["augment"]),
        init_state=loop_config.get("init_state"),
    )
    bar.close()


def train_full(
    ctx: RunContext,
    *,
    hparams: dict[str, Any] | None = None,
    features_stage: str | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Stage ``train``: DDP training of ``hparams`` (default: the config's) on the run's features."""
    return ctx.run_stage(STAGE, lambda: _train(ctx, hparams, features_stage, epochs))


def _train(ctx: RunContext, hparams: dict[str, Any] | None, features_stage: str | None, epochs: int | None) -> dict[str, Any]:
    from pipeline.asr.training import resolve_augment, resolve_hparams
    from pipeline.data.dataset import split_by_utterance
    from pipeline.data.features import load_feature_index
    from pipeline.ray import ensure_ray

    hparams = {k: v for k, v in (hparams or {}).items() if not k.startswith("_")} or None
    model_cfg, train_cfg = resolve_hparams(ctx.config, hparams)
    augment = resolve_augment(ctx.config, hparams)
    if features_stage is None:
        features_stage = _winner_features(ctx, hparams)
    if epochs is not None:
        train_cfg = train_cfg.model_copy(update={"epochs": epochs})
    index = load_feature_index(ctx.store, ctx.run_id, stage=features_stage)
    train_idx, dev_idx = split_by_utterance(index["utterances"], train_cfg.dev_fraction, train_cfg.seed)
    init_state, init = initial_weights(ctx, model_cfg, train_cfg, int(index["n_mels"]))
    ensure_ray(ctx.config)
    trainer = _build_trainer(ctx, index, train_idx, dev_idx, model_cfg, train_cfg, augment, init_state)
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"full training failed: {result.error}")
    best_state, best_metrics, history = _best_and_history(result)
    _export(ctx, best_state, best_metrics, index, model_cfg, train_cfg, {"augment": augment.model_dump(mode="json"),
                                                                         "init": init})
    metrics = {
        "resumed_from": sorted({int(m["resumed_from"]) for _, m in result.best_checkpoints if m.get("resumed_from")}),
        "best_epoch": best_metrics["epoch"],
        "dev_wer": best_metrics["dev_wer"],
        "dev_cer": best_metrics["dev_cer"],
        "epochs": len(history),
        "n_train": len(train_idx),
        "n_dev": len(dev_idx),
        "workers": train_cfg.num_workers,
        "wall_s": round(wall, 2),
        "train_s": round(sum(h["seconds"] for h in history), 2),
        "pool_version": index.get("pool_version"),
        "init": init,
    }
    ctx.store.put_text(ctx.stage_key(STAGE, "metrics.json"), json.dumps(metrics, indent=2))
    ctx.store.put_text(ctx.stage_key(STAGE, "history.json"), json.dumps(history, indent=2))
    ctx.store.put_text(ctx.stage_key(STAGE, "hparams.json"), json.dumps({"model": model_cfg.model_dump(), "train": train_cfg.model_dump(),
                                                                          "augment": augment.model_dump(mode="json")}, indent=2))
    return {**metrics, "model": ctx.store.uri(ctx.stage_key(STAGE, "model.pt"))}


def _winner_features(ctx: RunContext, hparams: dict[str, Any] | None) -> str:
    """The features stage of the front end ``hparams`` chose (n_mels/win_ms/hop_ms), built if missing."""
    from pipeline.asr.extraction import extract_pool_features

    fe = ctx.config.features.model_copy(update={k: v for k, v in (hparams or {}).items() if k in ("n_mels", "win_ms", "hop_ms")})
    return extract_pool_features(ctx, fe, progress=False)["stage"]


def initial_weights(ctx: RunContext, model_cfg: ModelConfig, train_cfg: TrainConfig,
                    n_mels: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(production's or the search's state dict, or None; the record of the choice) for ``train.init``."""
    if train_cfg.init == "scratch":
        return None, {"init": "scratch", "reason": "train.init: scratch"}
    if train_cfg.init == "search":
        return _search_weights(ctx, model_cfg, n_mels)
    from pipeline.asr.evaluation import model_meta
    from pipeline.tracking import production_model

    prod = production_model(ctx.config.mlflow)
    if prod is None:
        return None, {"init": "scratch", "requested": "production", "reason": "no production model (cold start)"}
    meta = model_meta(prod.path)
    record = {"requested": "production", "production_version": prod.version, "production_run_id": prod.run_id}

    def load() -> dict[str, Any]:
        module = torch.jit.load(str(prod.path), map_location="cpu")
        return {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    return _fit(model_cfg, n_mels, meta.get("model") or {}, int((meta.get("frontend") or {}).get("n_mels", -1)), load,
                record, "production", "production", f"warm start from production v{prod.version}")


def _search_weights(ctx: RunContext, model_cfg: ModelConfig, n_mels: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The search's selected trial's top-rung weights for ``train.init: search``, or scratch and why."""
    from pipeline.run import SEARCH_WEIGHTS

    key = ctx.stage_key(*SEARCH_WEIGHTS)
    if not ctx.store.exists(key):
        return None, {"init": "scratch", "requested": "search", "reason": f"no search weights at {ctx.store.uri(key)}"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SEARCH_WEIGHTS[1]
        ctx.store.download_file(key, path)
        saved = torch.load(path, map_location="cpu", weights_only=False)
    trial, epoch = saved.get("trial_id"), saved.get("epoch")
    return _fit(model_cfg, n_mels, saved.get("model_cfg") or {}, int(saved.get("n_mels", -1)), lambda: saved["model"],
                {"requested": "search", "search_trial": trial, "search_epoch": epoch}, "search", "the search's trial",
                f"warm start from search trial {trial} at the top rung (epoch {epoch} on the proxy)")


def _fit(model_cfg: ModelConfig, n_mels: int, their_cfg: dict[str, Any], their_mels: int, load, record: dict[str, Any],
         init: str, whose: str, reason: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``load()``'s weights when the architecture matches (:data:`ARCH_KEYS`, n_mels) and they load;
    otherwise None and a scratch record saying why."""
    from pipeline.asr.training import build_model, init_weights

    differ = [f"{k} {v!r} -> {getattr(model_cfg, k)!r}" for k, v in sorted(their_cfg.items())
              if k in ARCH_KEYS and getattr(model_cfg, k, v) != v]
    if their_mels != n_mels:
        differ.append(f"n_mels {their_mels} -> {n_mels}")
    if differ:
        return None, {**record, "init": "scratch", "reason": f"architecture differs from {whose}: {', '.join(differ)}"}
    fresh = build_model(model_cfg, n_mels)
    derived = set(dict(fresh.named_buffers())) - set(fresh.state_dict())  # e.g. positional tables: rebuilt, not loaded
    state = {k: v for k, v in load().items() if k not in derived}
    try:  # the same shapes, checked here so that a mismatch is a recorded scratch start, not a failed stage
        init_weights(fresh, state)
    except RuntimeError as exc:
        return None, {**record, "init": "scratch", "reason": f"{whose}'s weights do not fit: {str(exc)[:300]}"}
    return state, {**record, "init": init, "reason": reason}


def _build_trainer(ctx: RunContext, index: dict[str, Any], train_idx: list[int], dev_idx: list[int],
                   model_cfg: ModelConfig, train_cfg: TrainConfig, augment: AugmentConfig,
                   init_state: dict[str, Any] | None = None):
    """Ray Train's ``TorchTrainer`` over :func:`_worker_loop`, restartable from the run's work area."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.progress import progress_file
    from pipeline.ray import ray_storage, worker_resources

    storage_path, storage_fs = ray_storage(ctx, STAGE)
    # a hung worker: the controller's health check gives up on it, the live ranks' collectives time out
    os.environ[WORKER_HEALTH_CHECK_TIMEOUT_ENV] = str(train_cfg.hang_timeout_s)  # propagated to the controller by Ray Train
    # the controller registers a checkpoint when it next polls the workers: what a lost node can cost beyond its epoch
    os.environ[CONTROLLER_POLL_ENV] = str(train_cfg.report_poll_s)
    return TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": ctx.config.model_dump(mode="json"),
            "root": ctx.store.root,
            "index": index,
            "train_idx": train_idx,
            "dev_idx": dev_idx,
            "model": model_cfg.model_dump(),
            "train": train_cfg.model_dump(),
            "augment": augment.model_dump(mode="json"),
            "threads": max(1, (os.cpu_count() or 1) // train_cfg.num_workers),
            "init_state": init_state,
            "progress_file": progress_file(),  # rank 0 keeps it up to date (pipeline.progress)
        },
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker=worker_resources(ctx.config, train_cfg.use_gpu)),
        torch_config=TorchConfig(timeout_s=train_cfg.hang_timeout_s),
        run_config=RunConfig(
            name="ddp",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )


def _load_state(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)


def _best_and_history(result) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The best epoch's checkpoint state and metrics (by dev WER, the later epoch on a tie), and the
    whole history (from the latest checkpoint: the best one holds it only up to its epoch)."""
    ranked = sorted(result.best_checkpoints or [], key=lambda cm: (cm[1]["dev_wer"], -cm[1]["epoch"]))
    if not ranked:
        raise RuntimeError("full training reported no checkpoint")
    best_ckpt, best_metrics = ranked[0]
    latest = max(result.best_checkpoints, key=lambda cm: cm[1]["epoch"])
    return _load_state(best_ckpt), best_metrics, _load_state(latest[0])["history"]


def _export(ctx: RunContext, state: dict[str, Any], best_metrics: dict[str, Any], index: dict[str, Any],
            model_cfg: ModelConfig, train_cfg: TrainConfig, extra: dict[str, Any]) -> None:
    """Export the best epoch's model with its front end to ``runs/{run_id}/train/model.pt``."""
    from pipeline.asr.export import export_model
    from pipeline.asr.frontend import settings_hash
    from pipeline.asr.training import load_checkpoint_model

    model = load_checkpoint_model(state)
    meta = {
        "run_id": ctx.run_id,
        "pool_version": index.get("pool_version"),
        "model": model_cfg.model_dump(),
        "train": train_cfg.model_dump(),
        "best_epoch": best_metrics["epoch"],
        "dev_wer": best_metrics["dev_wer"],
        "frontend_hash": settings_hash(index["frontend"]),
        "features": _frontend_of(index),
        **extra,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, index["frontend"], Path(tmp) / "model.pt", meta)
        ctx.store.upload_file(ctx.stage_key(STAGE, "model.pt"), path)


def _frontend_of(index: dict[str, Any]) -> dict[str, Any]:
    """n_mels/win_ms/hop_ms of a feature index's front end (its settings count samples)."""
    fe = index["frontend"]
    rate = float(fe["sample_rate"])
    return {"n_mels": int(fe["n_mels"]), "win_ms": round(1000.0 * fe["win_length"] / rate, 3),
            "hop_ms": round(1000.0 * fe["hop_length"] / rate, 3)}
