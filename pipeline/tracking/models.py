"""Registered model versions: aliases, lookup, creation, and download to a local TorchScript file.

:func:`resolve_model_uri` turns ``models:/asr@production`` or ``models:/asr/3`` into a local
path (downloaded once into ``mlflow.model_cache``, checked against its sha256 tag);
:func:`production_model` is the version behind alias ``production`` (``None`` on a cold
start). :func:`log_pyfunc_model` logs a model file as an MLflow pyfunc model with a signature.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import MlflowConfig
from pipeline.storage import sha256_file
from pipeline.tracking.connection import (
    client,
    experiment_id,
    is_missing,
    mlflow_context,
)
from pipeline.tracking.names import MODEL_FILE, PRODUCTION, TAG_RUN_ID, TAG_SHA256

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))/?$")


class RegistryError(RuntimeError):
    """A registry operation cannot proceed; the message says what to do."""


@dataclass
class RegisteredModel:
    """One registered version, resolved to a local TorchScript file."""

    name: str
    version: str
    path: Path
    tags: dict[str, str]
    run_id: str | None  # the pipeline run that produced it

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def aliases(cfg: MlflowConfig) -> dict[str, str]:
    """alias -> version of the registered model ({} when it does not exist yet)."""
    try:
        # the SQL store gives versions as ints, the REST API as strings: always strings here
        return {k: str(v) for k, v in client(cfg).get_registered_model(cfg.registered_model).aliases.items()}
    except Exception as exc:  # noqa: BLE001
        if is_missing(exc):
            return {}
        raise


def get_version(cfg: MlflowConfig, name: str, version: str | None = None, alias: str | None = None) -> Any:
    """The model version ``version``, or the one behind ``alias``; a missing one raises :class:`RegistryError`."""
    c = client(cfg)
    if alias is not None:
        found = aliases(cfg).get(alias)
        if found is None:
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (see 'asr-retune history')")
        version = found
    try:
        return c.get_model_version(name, str(version))
    except Exception as exc:  # noqa: BLE001
        if is_missing(exc):
            raise RegistryError(f"registered model {name!r} has no version {version}") from None
        raise


def find_version_for_run(cfg: MlflowConfig, run_id: str) -> Any | None:
    """The version registered for pipeline run ``run_id`` (tag ``asr_run_id``), if any."""
    c = client(cfg)
    found = c.search_model_versions(f"name = '{cfg.registered_model}' and tags.{TAG_RUN_ID} = '{run_id}'")
    found = sorted(found, key=lambda v: int(v.version))
    if len(found) > 1:
        log.warning("run %s has %d registered versions (%s); using the first",
                    run_id, len(found), ", ".join(v.version for v in found))
    return found[0] if found else None


def ensure_registered_model(c: MlflowClient, name: str) -> None:
    try:
        c.get_registered_model(name)
    except Exception as exc:  # noqa: BLE001
        if not is_missing(exc):
            raise
        with contextlib.suppress(Exception):  # a concurrent creator wins
            c.create_registered_model(name, description="asr-retune: weekly retrained CTC model (TorchScript)")
        c.get_registered_model(name)


def _signature() -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.double), "wave")]),
        outputs=Schema([ColSpec(DataType.string, "text")]),
    )


def log_pyfunc_model(
    cfg: MlflowConfig, mlflow_run: str, local: Path, tags: dict[str, str], *, python_model: Path
) -> tuple[str, str]:
    """The run's logged pyfunc model (logged now unless a previous attempt already did, completely).

    ``python_model`` is the code file MLflow copies into the model; ``local`` its artifact.
    Returns (model URI, model id).
    """
    with mlflow_context(cfg) as mlflow:
        exp = experiment_id(cfg)
        existing = mlflow.search_logged_models(
            experiment_ids=[exp], filter_string=f"source_run_id = '{mlflow_run}'", output_format="list"
        )
        for lm in existing:
            if lm.name != "model" or lm.tags.get(TAG_SHA256) != tags[TAG_SHA256]:
                continue
            if str(getattr(lm.status, "value", lm.status)) == "READY":
                return f"models:/{lm.model_id}", lm.model_id
            # an attempt that died mid-upload left it PENDING/FAILED: never register that one
            log.warning("logged model %s of run %s is %s (an interrupted attempt): logging the model again",
                        lm.model_id, mlflow_run, lm.status)
        with mlflow.start_run(run_id=mlflow_run):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(python_model),
                artifacts={"model": str(local)},
                signature=_signature(),
                pip_requirements=cfg.pip_requirements,
                tags=tags,
                metadata={"format": "asr-retune torchscript CTC", "artifact": f"artifacts/{MODEL_FILE}"},
            )
        return info.model_uri, info.model_id


def _download_version(cfg: MlflowConfig, name: str, version: str, tags: dict[str, str]) -> Path:
    expected = tags.get(TAG_SHA256)
    dest = Path(cfg.model_cache).expanduser().resolve() / name / str(version) / MODEL_FILE
    if dest.exists() and (expected is None or sha256_file(dest) == expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, mlflow_context(cfg) as mlflow:
        got = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}/artifacts/{MODEL_FILE}", dst_path=tmp
        ))
        if expected is not None and sha256_file(got) != expected:
            raise RegistryError(
                f"models:/{name}/{version}: downloaded {MODEL_FILE} does not match its sha256 tag; "
                "the artifact store holds a different file than was registered"
            )
        os.replace(got, dest)
    return dest


def resolve_model_uri(uri: str, mlflow_cfg: MlflowConfig) -> Path:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> local path of its TorchScript file."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise ValueError(f"not a registry URI: {uri!r} (expected models:/NAME@ALIAS or models:/NAME/VERSION)")
    mv = get_version(mlflow_cfg, m["name"], version=m["version"], alias=m["alias"])
    return _download_version(mlflow_cfg, m["name"], mv.version, dict(mv.tags))


def production_model(mlflow_cfg: MlflowConfig) -> RegisteredModel | None:
    """The version behind alias ``production``, downloaded; ``None`` when there is none (cold start).

    An unreachable tracking server raises: that is never mistaken for a cold start.
    """
    name = mlflow_cfg.registered_model
    version = aliases(mlflow_cfg).get(PRODUCTION)
    if version is None:
        return None
    mv = get_version(mlflow_cfg, name, version=version)
    tags = dict(mv.tags)
    return RegisteredModel(name, str(mv.version), _download_version(mlflow_cfg, name, mv.version, tags), tags,
                           tags.get(TAG_RUN_ID))
