"""Where heavy work runs: Ray, in-process on one machine or a cluster in production.

``ray.address: null`` starts a local Ray inside this process; ``auto`` connects to the local
multi-node cluster of ``asr-retune cluster up`` (else to what Ray itself finds), ``ray://host:10001``
or ``host:port`` to a cluster, so the same stage code submits to KubeRay there.

Placement: search trials and DDP workers request a sliver of the spot resource (``ray.spot_resource``),
which only the spot worker nodes advertise, so they never land on the head, where the driver runs. The
in-process Ray declares that resource itself (its one node is head and spot node at once); a cluster
must advertise it on its spot workers (``ray start --resources``; KubeRay: the group's ``rayStartParams``).
``ray.spot_resource: null`` requests nothing. Ray's experiment storage for a run lives in the run's
work area of the object store (a local folder, or S3 through pyarrow's S3 filesystem with the
configured endpoint).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline.config import Config
from pipeline.run import RunContext
from pipeline.storage import LocalStore, S3Store, join

log = logging.getLogger(__name__)

SPOT_REQUEST = 0.01  # of the spot resource per trial or DDP worker: a placement marker; CPUs/GPUs size the work


def ensure_ray(config: Config) -> None:
    """Start or connect to Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if config.ray.address:
        kwargs["address"] = _cluster_address(config)
    else:
        kwargs["include_dashboard"] = False
        kwargs["runtime_env"] = {"worker_process_setup_hook": "pipeline.ray.quiet_ray_worker"}
        kwargs["resources"] = in_process_resources(config)
        if config.ray.num_cpus:
            kwargs["num_cpus"] = config.ray.num_cpus
    ray.init(**kwargs)
    name = spot_resource(config)
    if config.ray.address and name and name not in ray.cluster_resources():
        log.warning("Ray at %s advertises no %r resource now: trials and DDP workers wait for a spot node to join "
                    "(set ray.spot_resource: null to place them on any node)", kwargs["address"], name)


def _cluster_address(config: Config) -> str:
    """``ray.address``, with ``auto`` meaning the local cluster of ``asr-retune cluster up`` when one is recorded."""
    address = config.ray.address
    if address != "auto":
        return address
    from pipeline.cluster import local_cluster_address

    return local_cluster_address(config) or address


def spot_resource(config: Config) -> str | None:
    """The custom resource of the spot worker nodes (``ray.spot_resource``; None: no placement)."""
    return getattr(config.ray, "spot_resource", "spot") or None


def _spot_request(config: Config) -> dict[str, float]:
    name = spot_resource(config)
    return {name: SPOT_REQUEST} if name else {}


def in_process_resources(config: Config) -> dict[str, float]:
    """Custom resources of the in-process Ray: the spot resource, so that what requests it is schedulable
    on the one local node (as much of it as there are CPUs: ``SPOT_REQUEST`` never runs out first)."""
    name = spot_resource(config)
    return {name: float(config.ray.num_cpus or os.cpu_count() or 1)} if name else {}


def trial_resources(config: Config) -> dict[str, float]:
    """One search trial's resources, as ``tune.with_resources`` takes them: ``search.cpus_per_trial``,
    ``search.gpus_per_trial``, and a sliver of the spot resource."""
    s = config.search
    return {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial, **_spot_request(config)}


def worker_resources(config: Config, use_gpu: bool) -> dict[str, float]:
    """One DDP worker's ``ScalingConfig.resources_per_worker``: Ray Train's own default (1 CPU, or 1 GPU
    with ``use_gpu``) and a sliver of the spot resource."""
    return {"GPU" if use_gpu else "CPU": 1.0, **_spot_request(config)}


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
