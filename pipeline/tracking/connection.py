"""The connection to MLflow: tracking URI, experiments and the client the other modules share.

The embedded default is a SQLite store with local artifacts (both relative to the
working directory); production points ``mlflow.tracking_uri`` at a tracking server.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import MlflowConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient

SEARCH_EXPERIMENT = "asr-retune-search"


def tracking_uri(cfg: MlflowConfig) -> str:
    """The configured tracking URI; for a SQLite store, its folder is created first."""
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


def setup_mlflow(cfg: MlflowConfig, experiment: str) -> str:
    """Point MLflow at the configured store and return the experiment id (created if missing)."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        return existing.experiment_id
    location = cfg.artifact_root
    if location and "://" not in location:
        Path(location).mkdir(parents=True, exist_ok=True)
        location = Path(location).resolve().as_uri()
    if not uri.startswith(("sqlite:", "file:")) and "://" not in (cfg.artifact_root or "://"):
        location = None  # a tracking server chooses its own artifact store
    return mlflow.create_experiment(experiment, artifact_location=location)


def quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextlib.contextmanager
def mlflow_context(cfg: MlflowConfig) -> Iterator[Any]:
    """MLflow's fluent API pointed at ``cfg`` for the block; the previous URIs are restored."""
    import mlflow

    prev_tracking, prev_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(prev_tracking)
        mlflow.set_registry_uri(prev_registry)


def client(cfg: MlflowConfig) -> MlflowClient:
    """A client of the configured tracking store and model registry (one per URI)."""
    return _client(tracking_uri(cfg))


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_missing(exc: Exception) -> bool:
    """Whether an MLflow error says the object does not exist."""
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


_EXPERIMENTS: dict[tuple[str, str], str] = {}


def experiment_id(cfg: MlflowConfig) -> str:
    """The pipeline's experiment ``cfg.experiment`` (created on first use, located at ``artifact_root``)."""
    name = cfg.experiment
    cached = _EXPERIMENTS.get((cfg.tracking_uri, name))
    if cached is not None:
        return cached
    found = _find_or_create_experiment(cfg, name)
    _EXPERIMENTS[(cfg.tracking_uri, name)] = found
    return found


def _find_or_create_experiment(cfg: MlflowConfig, name: str) -> str:
    """Through :func:`setup_mlflow`, so every stage places artifacts alike."""
    quiet_mlflow()
    with mlflow_context(cfg):
        try:
            return setup_mlflow(cfg, name)
        except Exception:  # noqa: BLE001 - created concurrently by another process: take it
            exp = client(cfg).get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id
