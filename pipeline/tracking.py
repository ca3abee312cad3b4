"""MLflow set-up shared by the stages that track runs (search, registry).

The embedded default is a SQLite store with local artifacts (both relative to the
working directory); production points ``mlflow.tracking_uri`` at a tracking server.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import MlflowConfig

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
