"""Where heavy work runs: Ray, in-process on one machine or a cluster in production.

``ray.address: null`` starts a local Ray inside this process; ``ray://host:10001`` (or
``auto``) connects to a cluster, so the same stage code submits to KubeRay there.
Ray's experiment storage for a run lives in the run's partition of the object store
(a local folder, or S3 through pyarrow's S3 filesystem with the configured endpoint).
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.config import Config
from pipeline.run import RunContext
from pipeline.storage import LocalStore, S3Store, join


def ensure_ray(config: Config) -> None:
    """Start or connect to Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if config.ray.address:
        kwargs["address"] = config.ray.address
    else:
        kwargs["include_dashboard"] = False
        kwargs["runtime_env"] = {"worker_process_setup_hook": "pipeline.ray.quiet_ray_worker"}
        if config.ray.num_cpus:
            kwargs["num_cpus"] = config.ray.num_cpus
    ray.init(**kwargs)


def quiet_ray_worker() -> None:
    """Run in every worker of a local Ray (``worker_process_setup_hook``). Without the
    dashboard there is no state API, so Ray Train's placement-group cleaner would warn
    "Failed to query Ray Train Controller actor state" every second of every training run."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def ray_storage(ctx: RunContext, name: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for a Ray experiment kept in the run's work area.

    The work area ``runs/{run_id}/_work/{name}`` is not a stage partition, so a retried
    stage finds its checkpoints there instead of having them cleared.
    """
    key = join("runs", ctx.run_id, "_work", name)
    store = ctx.store
    if isinstance(store, LocalStore):
        path = store.base / key
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    if isinstance(store, S3Store):
        import pyarrow.fs

        cfg = ctx.config.storage
        endpoint = cfg.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
        fs_kwargs: dict[str, Any] = {"region": cfg.s3_region}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            fs_kwargs.update(endpoint_override=host, scheme=scheme)
        fs = pyarrow.fs.S3FileSystem(**fs_kwargs)
        return f"{store.bucket}/{join(store.prefix, key)}", fs
    raise TypeError(f"no Ray storage for {type(store).__name__}")
