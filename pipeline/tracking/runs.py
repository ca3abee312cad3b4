"""The MLflow run of a pipeline run: found by tag ``asr_run_id`` or created, then logged once.

:func:`training_run` logs the run's parameters, the training metrics and curve, the search
leaderboard and the lineage tags; :func:`log_gate` attaches the gate's decision and report.
Reading a model's metadata needs the model library, which this core package does not
import: callers pass ``read_meta`` (a local model file -> its metadata dict).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config
from pipeline.tracking.connection import client, experiment_id
from pipeline.tracking.lineage import lineage_tags, read_json
from pipeline.tracking.names import MODEL_FILE, TAG_KIND, TAG_LOGGED, TAG_RUN_ID
from pipeline.tracking.promotion import actor

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.run import RunContext

ReadMeta = Callable[[Path], dict[str, Any]]
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-./ ]")


def metric_name(name: str) -> str:
    return _METRIC_NAME.sub("_", name)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif prefix:
        out[prefix] = value
    return out


def find_training_run(ctx: RunContext) -> str | None:
    c = client(ctx.config.mlflow)
    exp = experiment_id(ctx.config.mlflow)
    runs = c.search_runs([exp], filter_string=f"tags.{TAG_RUN_ID} = '{ctx.run_id}'", max_results=5,
                         order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def _model_meta(ctx: RunContext, model_key: str, read_meta: ReadMeta) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / MODEL_FILE
        ctx.store.download_file(model_key, local)
        return read_meta(local)


def training_run(ctx: RunContext, *, read_meta: ReadMeta) -> str:
    """The MLflow run of this pipeline run (found by tag, else created), with params, metrics and lineage.

    If the train stage already created a run tagged ``asr_run_id``, that run is used.
    Logging is repeated until the tag ``asr_logged`` marks it complete (a retry after
    a crash finishes the job; params are logged with the same values, so repeating is safe).
    """
    cfg = ctx.config.mlflow
    c = client(cfg)
    run_id = find_training_run(ctx)
    created = run_id is None
    if run_id is None:
        run = c.create_run(
            experiment_id(cfg),
            run_name=f"train {ctx.run_id}",
            tags={TAG_RUN_ID: ctx.run_id, TAG_KIND: "train", "mlflow.user": actor(None)},
        )
        run_id = run.info.run_id
    run = c.get_run(run_id)
    if run.data.tags.get(TAG_LOGGED) == "true":
        return run_id
    model_key = ctx.stage_key("train", MODEL_FILE)
    meta = _model_meta(ctx, model_key, read_meta) if ctx.store.exists(model_key) else {}
    for key, value in lineage_tags(ctx, meta).items():
        c.set_tag(run_id, key, value)
    _log_params(c, run_id, ctx.config, meta, dict(run.data.params))
    _log_training_metrics(c, run_id, ctx)
    c.set_tag(run_id, TAG_LOGGED, "true")
    if created:
        c.set_terminated(run_id, "FINISHED")
    return run_id


def _log_params(c: MlflowClient, run_id: str, config: Config, meta: dict[str, Any], existing: dict[str, str]) -> None:
    """The run's configuration (model/train/features/audio), overlaid by what the model was built with."""
    from mlflow.entities import Param

    params: dict[str, Any] = {}
    for section in ("model", "train", "features", "audio"):
        _flatten(section, getattr(config, section).model_dump(mode="json"), params)
    for section in ("model", "train"):  # what the exported model says it was built with (the train stage)
        if isinstance(meta.get(section), dict):
            _flatten(section, meta[section], params)
    if isinstance(meta.get("frontend"), dict):
        _flatten("frontend", meta["frontend"], params)
    batch = [
        Param(k, str(v)[:6000]) for k, v in sorted(params.items()) if k not in existing and not isinstance(v, (list, dict))
    ]
    for i in range(0, len(batch), 100):
        c.log_batch(run_id, params=batch[i : i + 100])


def _log_metrics(c: MlflowClient, run_id: str, metrics: list[Any]) -> None:
    for i in range(0, len(metrics), 500):
        c.log_batch(run_id, metrics=metrics[i : i + 500])


def _log_training_metrics(c: MlflowClient, run_id: str, ctx: RunContext) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    for key, value in _flatten("", read_json(ctx.store, ctx.stage_key("train", "metrics.json")) or {}, {}).items():
        if _numeric(value):
            metrics.append(Metric(metric_name(key), float(value), now, 0))
    for row in read_json(ctx.store, ctx.stage_key("train", "history.json")) or []:
        step = int(row.get("epoch", 0))
        for key, value in row.items():
            if key != "epoch" and _numeric(value):
                metrics.append(Metric(metric_name(f"epoch.{key}"), float(value), now, step))
    _log_metrics(c, run_id, metrics)
    for name in ("metrics.json", "history.json"):
        key = ctx.stage_key("train", name)
        if ctx.store.exists(key):
            c.log_text(run_id, ctx.store.get_text(key), f"train/{name}")
    key = ctx.stage_key("search", "leaderboard.json")
    if ctx.store.exists(key):
        c.log_text(run_id, ctx.store.get_text(key), "search/leaderboard.json")


def log_gate(
    ctx: RunContext,
    files: dict[str, str | os.PathLike],
    metrics: dict[str, float],
    tags: dict[str, str],
    *,
    read_meta: ReadMeta,
) -> str:
    """Attach the gate's decision and report to the training run (artifacts under ``gate/``)."""
    from mlflow.entities import Metric

    c = client(ctx.config.mlflow)
    run_id = training_run(ctx, read_meta=read_meta)
    for local in files.values():
        c.log_artifact(run_id, str(local), "gate")
    now = int(time.time() * 1000)
    _log_metrics(c, run_id, [Metric(metric_name(k), float(v), now, 0) for k, v in sorted(metrics.items()) if _numeric(v)])
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v)[:5000])
    return run_id
