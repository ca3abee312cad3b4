"""The MLflow side of the pipeline: the training run, registered model versions and aliases.

* :func:`training_run` finds or creates the MLflow run of a pipeline run (tag
  ``asr_run_id``) and logs its parameters, metrics, training curve and lineage tags
  (pool version, golden-set version, config hash, code version, run id).
* :func:`register` (stage ``register``) logs the exported TorchScript file as an MLflow
  pyfunc model with a signature (:mod:`pipeline.serving.pyfunc_model`) and creates one registered
  model version per pipeline run, tagged with the run id: a retried stage finds that version
  instead of creating a second one. On a passed gate the alias ``challenger`` moves to it.
* :func:`promote` and :func:`rollback` move the alias ``production``. Every alias move is
  recorded with when, who, why, from and to: in the store (``state/registry/history.jsonl``,
  read by :func:`history`) and in MLflow (registered-model tags ``audit.NNNNNN`` and
  ``last_*`` tags on the versions involved). A rollback goes back to the version that was
  production before the current one was promoted (history is replayed as a stack).
* :func:`resolve_model_uri` turns ``models:/asr@production`` or ``models:/asr/3`` into a
  local TorchScript path (downloaded once into a cache, checked against its sha256 tag).

The embedded default tracks into SQLite with local artifacts (``mlflow.tracking_uri`` /
``mlflow.artifact_root``); production points ``tracking_uri`` at an MLflow server.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import getpass
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import PROJECT_ROOT, Config, MlflowConfig
from pipeline.storage import ObjectStore

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.run import RunContext

log = logging.getLogger(__name__)

# tag names follow pipeline.stages.search.stage's ("asr_run_id", "asr_kind"): plain keys, no quoting in filters
TAG_RUN_ID = "asr_run_id"
TAG_KIND = "asr_kind"
TAG_SHA256 = "asr_sha256"
TAG_POOL = "asr_pool_version"
TAG_GOLDEN = "asr_golden_version"
TAG_CONFIG_HASH = "asr_config_hash"
TAG_CODE = "asr_code_version"
TAG_LOGGED = "asr_logged"
PRODUCTION = "production"
CHALLENGER = "challenger"
HISTORY_KEY = "state/registry/history.jsonl"
MODEL_FILE = "model.pt"
PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serving" / "pyfunc_model.py"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_\-]+)|/(?P<version>\d+))/?$")


class RegistryError(RuntimeError):
    """A registry operation cannot proceed; the message says what to do."""


class GateNotPassed(RegistryError):
    """``register`` was asked to register a candidate whose gate failed."""


class RegistrySettings(BaseModel):
    """Registry settings beyond :class:`MlflowConfig`'s (wanted under ``mlflow:`` in config.py)."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = "asr-retune"
    model_cache: str = ".asr-retune/model-cache"
    pip_requirements: list[str] = Field(default_factory=lambda: ["torch==2.11.0", "numpy", "pandas"])


def registry_settings(mlflow_cfg: MlflowConfig) -> RegistrySettings:
    """The fields of :class:`RegistrySettings` found on ``mlflow_cfg`` (defaults otherwise)."""
    values = {k: getattr(mlflow_cfg, k) for k in RegistrySettings.model_fields if hasattr(mlflow_cfg, k)}
    return RegistrySettings(**values)


# --------------------------------------------------------------------------- MLflow access


def _tracking_uri(cfg: MlflowConfig) -> str:
    from pipeline.tracking import tracking_uri

    return tracking_uri(cfg)


@contextlib.contextmanager
def _mlflow(cfg: MlflowConfig) -> Iterator[Any]:
    """MLflow's fluent API pointed at ``cfg`` for the block; the previous URIs are restored."""
    import mlflow

    prev_tracking, prev_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = _tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(prev_tracking)
        mlflow.set_registry_uri(prev_registry)


def client(cfg: MlflowConfig) -> "MlflowClient":
    return _client(_tracking_uri(cfg))


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


_EXPERIMENTS: dict[tuple[str, str], str] = {}


def experiment_id(cfg: MlflowConfig) -> str:
    """The pipeline's experiment (created on first use, with ``artifact_root`` as its location)."""
    name = registry_settings(cfg).experiment
    cached = _EXPERIMENTS.get((cfg.tracking_uri, name))
    if cached is not None:
        return cached
    found = _find_or_create_experiment(cfg, name)
    _EXPERIMENTS[(cfg.tracking_uri, name)] = found
    return found


def _find_or_create_experiment(cfg: MlflowConfig, name: str) -> str:
    """Through :func:`pipeline.tracking.setup_mlflow`, so every stage places artifacts alike."""
    from pipeline.tracking import quiet_mlflow, setup_mlflow

    quiet_mlflow()
    with _mlflow(cfg):
        try:
            return setup_mlflow(cfg, name)
        except Exception:  # noqa: BLE001 - created concurrently by another process: take it
            exp = client(cfg).get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def _ensure_registered_model(c: "MlflowClient", name: str) -> None:
    try:
        c.get_registered_model(name)
    except Exception as exc:  # noqa: BLE001
        if not _is_missing(exc):
            raise
        with contextlib.suppress(Exception):  # a concurrent creator wins
            c.create_registered_model(name, description="asr-retune: weekly retrained CTC model (TorchScript)")
        c.get_registered_model(name)


def aliases(cfg: MlflowConfig) -> dict[str, str]:
    """alias -> version of the registered model ({} when it does not exist yet)."""
    try:
        # the SQL store gives versions as ints, the REST API as strings: always strings here
        return {k: str(v) for k, v in client(cfg).get_registered_model(cfg.registered_model).aliases.items()}
    except Exception as exc:  # noqa: BLE001
        if _is_missing(exc):
            return {}
        raise


# --------------------------------------------------------------------------- lineage


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def code_version() -> str:
    """``ASR_RETUNE_CODE_VERSION`` (set in images), else the git commit (``-dirty`` if modified)."""
    env = os.environ.get("ASR_RETUNE_CODE_VERSION")
    if env:
        return env
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(store: ObjectStore, key: str) -> Any:
    return json.loads(store.get_text(key)) if store.exists(key) else None


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif prefix:
        out[prefix] = value
    return out


_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-./ ]")


def metric_name(name: str) -> str:
    return _METRIC_NAME.sub("_", name)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _model_meta(ctx: "RunContext", model_key: str) -> dict[str, Any]:
    from pipeline.asr.export import load_exported

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / MODEL_FILE
        ctx.store.download_file(model_key, local)
        return load_exported(local).meta


def lineage(ctx: "RunContext", model_meta: dict[str, Any] | None = None) -> dict[str, str]:
    """Lineage tags of a pipeline run: pool version, golden version, config hash, code version, run id."""
    metrics = _read_json(ctx.store, ctx.stage_key("train", "metrics.json")) or {}
    meta = model_meta or {}
    pool = (
        metrics.get("pool_version")
        or meta.get("pool_version")
        or (meta.get("lineage") or {}).get("pool_version")
    )
    if not pool:
        for stage in ("train", "features", "ingest"):
            if ctx.is_complete(stage):
                pool = ctx.summary(stage).get("pool_version")
                if pool:
                    break
    decision = _read_json(ctx.store, ctx.stage_key("gate", "decision.json")) or {}
    golden = (decision.get("golden") or {}).get("version") or getattr(getattr(ctx.config, "gate", None), "golden_version", None)
    golden = golden or ctx.config.demo.golden_version
    return {
        TAG_RUN_ID: ctx.run_id,
        TAG_POOL: str(pool or "unknown"),
        TAG_GOLDEN: str(golden),
        TAG_CONFIG_HASH: config_hash(ctx.config),
        TAG_CODE: code_version(),
    }


# --------------------------------------------------------------------------- the training run


def find_training_run(ctx: "RunContext") -> str | None:
    c = client(ctx.config.mlflow)
    exp = experiment_id(ctx.config.mlflow)
    runs = c.search_runs([exp], filter_string=f"tags.{TAG_RUN_ID} = '{ctx.run_id}'", max_results=5,
                         order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def training_run(ctx: "RunContext") -> str:
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
            tags={TAG_RUN_ID: ctx.run_id, TAG_KIND: "train", "mlflow.user": _actor(None)},
        )
        run_id = run.info.run_id
    run = c.get_run(run_id)
    if run.data.tags.get(TAG_LOGGED) == "true":
        return run_id
    model_key = ctx.stage_key("train", MODEL_FILE)
    meta = _model_meta(ctx, model_key) if ctx.store.exists(model_key) else {}
    for key, value in lineage(ctx, meta).items():
        c.set_tag(run_id, key, value)
    _log_params(c, run_id, ctx.config, meta, dict(run.data.params))
    _log_training_metrics(c, run_id, ctx)
    c.set_tag(run_id, TAG_LOGGED, "true")
    if created:
        c.set_terminated(run_id, "FINISHED")
    return run_id


def _log_params(c: "MlflowClient", run_id: str, config: Config, meta: dict[str, Any], existing: dict[str, str]) -> None:
    """The run's configuration (model/train/features/audio), overlaid by what the model was built with."""
    from mlflow.entities import Param

    params: dict[str, Any] = {}
    for section in ("model", "train", "features", "audio"):
        _flatten(section, getattr(config, section).model_dump(mode="json"), params)
    for section in ("model", "train"):  # what the exported model says it was built with (pipeline.stages.train)
        if isinstance(meta.get(section), dict):
            _flatten(section, meta[section], params)
    if isinstance(meta.get("frontend"), dict):
        _flatten("frontend", meta["frontend"], params)
    batch = [
        Param(k, str(v)[:6000]) for k, v in sorted(params.items()) if k not in existing and not isinstance(v, (list, dict))
    ]
    for i in range(0, len(batch), 100):
        c.log_batch(run_id, params=batch[i : i + 100])


def _log_training_metrics(c: "MlflowClient", run_id: str, ctx: "RunContext") -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    for key, value in _flatten("", _read_json(ctx.store, ctx.stage_key("train", "metrics.json")) or {}, {}).items():
        if _numeric(value):
            metrics.append(Metric(metric_name(key), float(value), now, 0))
    for row in _read_json(ctx.store, ctx.stage_key("train", "history.json")) or []:
        step = int(row.get("epoch", 0))
        for key, value in row.items():
            if key != "epoch" and _numeric(value):
                metrics.append(Metric(metric_name(f"epoch.{key}"), float(value), now, step))
    for i in range(0, len(metrics), 500):
        c.log_batch(run_id, metrics=metrics[i : i + 500])
    for name in ("metrics.json", "history.json"):
        key = ctx.stage_key("train", name)
        if ctx.store.exists(key):
            c.log_text(run_id, ctx.store.get_text(key), f"train/{name}")
    key = ctx.stage_key("search", "leaderboard.json")
    if ctx.store.exists(key):
        c.log_text(run_id, ctx.store.get_text(key), "search/leaderboard.json")


def log_gate(ctx: "RunContext", files: dict[str, str | os.PathLike], metrics: dict[str, float], tags: dict[str, str]) -> str:
    """Attach the gate's decision and report to the training run (artifacts under ``gate/``)."""
    c = client(ctx.config.mlflow)
    run_id = training_run(ctx)
    for local in files.values():
        c.log_artifact(run_id, str(local), "gate")
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    batch = [Metric(metric_name(k), float(v), now, 0) for k, v in sorted(metrics.items()) if _numeric(v)]
    for i in range(0, len(batch), 500):
        c.log_batch(run_id, metrics=batch[i : i + 500])
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v)[:5000])
    return run_id


# --------------------------------------------------------------------------- production model and URIs


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


def _download_version(cfg: MlflowConfig, name: str, version: str, tags: dict[str, str]) -> Path:
    settings = registry_settings(cfg)
    expected = tags.get(TAG_SHA256)
    dest = Path(settings.model_cache).expanduser().resolve() / name / str(version) / MODEL_FILE
    if dest.exists() and (expected is None or sha256_file(dest) == expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, _mlflow(cfg) as mlflow:
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


def get_version(cfg: MlflowConfig, name: str, version: str | None = None, alias: str | None = None) -> Any:
    c = client(cfg)
    if alias is not None:
        found = aliases(cfg).get(alias)
        if found is None:
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (see 'asr-retune history')")
        version = found
    try:
        return c.get_model_version(name, str(version))
    except Exception as exc:  # noqa: BLE001
        if _is_missing(exc):
            raise RegistryError(f"registered model {name!r} has no version {version}") from None
        raise


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


# --------------------------------------------------------------------------- register (stage)


def find_version_for_run(cfg: MlflowConfig, run_id: str) -> Any | None:
    c = client(cfg)
    found = c.search_model_versions(f"name = '{cfg.registered_model}' and tags.{TAG_RUN_ID} = '{run_id}'")
    found = sorted(found, key=lambda v: int(v.version))
    if len(found) > 1:
        log.warning("run %s has %d registered versions (%s); using the first",
                    run_id, len(found), ", ".join(v.version for v in found))
    return found[0] if found else None


def _signature() -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.double), "wave")]),
        outputs=Schema([ColSpec(DataType.string, "text")]),
    )


def _logged_model_uri(cfg: MlflowConfig, mlflow_run: str, local: Path, tags: dict[str, str]) -> tuple[str, str]:
    """The run's logged pyfunc model (logged now unless a previous attempt already did, completely)."""
    with _mlflow(cfg) as mlflow:
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
                python_model=str(PYFUNC_CODE),
                artifacts={"model": str(local)},
                signature=_signature(),
                pip_requirements=registry_settings(cfg).pip_requirements,
                tags=tags,
                metadata={"format": "asr-retune torchscript CTC", "artifact": f"artifacts/{MODEL_FILE}"},
            )
        return info.model_uri, info.model_id


def _decision(ctx: "RunContext") -> dict[str, Any]:
    key = ctx.stage_key("gate", "decision.json")
    if not ctx.store.exists(key):
        raise RegistryError(f"no gate decision at {ctx.store.uri(key)}: run 'asr-retune gate --run-id {ctx.run_id}' first")
    return json.loads(ctx.store.get_text(key))


def register(ctx: "RunContext", *, actor: str | None = None) -> dict[str, Any]:
    """Stage ``register``: one registered version for this run's gated candidate; alias ``challenger``.

    Raises :class:`GateNotPassed` when the gate failed (nothing is registered). A retry finds
    the version already created for this run (tag ``asr_run_id``) instead of adding one.
    """

    def body() -> dict[str, Any]:
        decision = _decision(ctx)
        if not decision.get("passed"):
            failing = ", ".join(decision.get("failing_rules") or []) or "?"
            raise GateNotPassed(
                f"the gate of run {ctx.run_id} failed ({failing}): nothing registered. "
                f"See {ctx.store.uri(ctx.stage_key('gate', 'report.html'))}; to override, re-run the gate "
                "with --force-reason."
            )
        cfg = ctx.config.mlflow
        name = cfg.registered_model
        c = client(cfg)
        mlflow_run = training_run(ctx)
        model_key = decision["candidate"]["key"]
        created = False
        mv = find_version_for_run(cfg, ctx.run_id)
        if mv is None:
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / MODEL_FILE
                _fetch(ctx.store, model_key, local)
                sha = sha256_file(local)
                if decision["candidate"].get("sha256") not in (None, sha):
                    raise RegistryError(
                        f"{model_key} changed since the gate evaluated it (sha256 differs): re-run the gate"
                    )
                from pipeline.asr.export import load_exported

                run_tags = {**lineage(ctx, load_exported(local).meta), TAG_SHA256: sha}
                model_uri, model_id = _logged_model_uri(cfg, mlflow_run, local, run_tags)
                _ensure_registered_model(c, name)
                version_tags = {**run_tags, **_gate_tags(decision)}
                mv = c.create_model_version(
                    name, source=model_uri, run_id=mlflow_run, tags=version_tags, model_id=model_id,
                    description=f"asr-retune run {ctx.run_id}",
                )
                created = True
        moved = _move_alias(ctx, CHALLENGER, str(mv.version), action="register",
                            reason=_register_reason(decision), actor=actor)
        return {
            "registered": True,
            "created": created,
            "model": name,
            "version": str(mv.version),
            "model_uri": f"models:/{name}/{mv.version}",
            "alias": CHALLENGER,
            "alias_moved": moved is not None,
            "mlflow_run_id": mlflow_run,
            "forced": bool(decision.get("forced")),
        }

    def body_in_mlflow() -> dict[str, Any]:
        # MLflow's SQL registry resolves a version's models:/m-... source through the global
        # tracking URI, so the whole stage runs with it pointed at our tracking store.
        with _mlflow(ctx.config.mlflow):
            return body()

    return ctx.run_stage("register", body_in_mlflow)


def _fetch(store: ObjectStore, key: str, local: Path) -> None:
    if os.path.isfile(key):
        shutil.copyfile(key, local)
    else:
        store.download_file(key, local)


def _gate_tags(decision: dict[str, Any]) -> dict[str, str]:
    tags = {
        "gate.passed": str(bool(decision.get("passed"))).lower(),
        "gate.forced": str(bool(decision.get("forced"))).lower(),
        "gate.cold_start": str(bool(decision.get("cold_start"))).lower(),
        "gate.mode": str(decision.get("mode")),
        "gate.candidate_wer": f"{(decision.get('candidate') or {}).get('wer')}",
        "gate.decision_uri": str(decision.get("decision_uri", "")),
        "gate.report_uri": str(decision.get("report_uri", "")),
    }
    if decision.get("production"):
        tags["gate.production_version"] = str(decision["production"].get("version"))
    if decision.get("forced"):
        tags["gate.force_reason"] = str(decision.get("force_reason"))[:5000]
        tags["gate.forced_by"] = str(decision.get("forced_by"))
    return tags


def _register_reason(decision: dict[str, Any]) -> str:
    if decision.get("forced"):
        return f"gate FORCED by {decision.get('forced_by')}: {decision.get('force_reason')}"
    return "gate passed" + (" (cold start: absolute rules only)" if decision.get("cold_start") else "")


# --------------------------------------------------------------------------- alias moves and history


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    env = os.environ.get("ASR_RETUNE_ACTOR")
    if env:
        return env
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def history(store: ObjectStore) -> list[dict[str, Any]]:
    """Every recorded alias move, oldest first."""
    if not store.exists(HISTORY_KEY):
        return []
    return [json.loads(line) for line in store.get_text(HISTORY_KEY).splitlines() if line.strip()]


def _append_history(store: ObjectStore, entry: dict[str, Any]) -> None:
    # Read-modify-write of one small object: atomic per write, but two concurrent movers could
    # lose one line. Alias moves are rare and serialized by the scheduler / on-call.
    old = store.get_text(HISTORY_KEY) if store.exists(HISTORY_KEY) else ""
    store.put_text(HISTORY_KEY, old + json.dumps(entry, sort_keys=True) + "\n")


def production_stack(entries: list[dict[str, Any]], model: str) -> list[str]:
    """Production versions in promotion order, replaying promotions (push) and rollbacks (pop)."""
    stack: list[str] = []
    for e in entries:
        if e.get("alias") != PRODUCTION or e.get("model") != model:
            continue
        if e.get("action") == "rollback":
            if stack:
                stack.pop()
            if e.get("to_version") and (not stack or stack[-1] != e["to_version"]):
                stack.append(e["to_version"])
        elif e.get("to_version"):
            if not stack or stack[-1] != e["to_version"]:
                stack.append(e["to_version"])
    return stack


def _move_alias(
    ctx: "RunContext", alias: str, version: str, *, action: str, reason: str, actor: str | None
) -> dict[str, Any] | None:
    """Point ``alias`` at ``version`` and record the move; ``None`` if it was already there (and recorded)."""
    cfg = ctx.config.mlflow
    name = cfg.registered_model
    c = client(cfg)
    current = aliases(cfg).get(alias)
    past = [e for e in history(ctx.store) if e.get("alias") == alias and e.get("model") == name]
    if current == version:
        if past and past[-1].get("to_version") == version:
            return None
        recovered = True  # a previous attempt moved the alias but did not record it
    else:
        recovered = False
    who = _actor(actor)
    entry = {
        "seq": len(history(ctx.store)) + 1,
        "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "actor": who,
        "action": action,
        "model": name,
        "alias": alias,
        "from_version": (past[-1].get("to_version") if recovered and past else current),
        "to_version": version,
        "reason": reason,
        "run_id": ctx.run_id,
    }
    if recovered:
        entry["recovered"] = True
    if not recovered:
        c.set_registered_model_alias(name, alias, version)
    _record_in_mlflow(c, name, entry)
    _append_history(ctx.store, entry)
    return entry


def _record_in_mlflow(c: "MlflowClient", name: str, entry: dict[str, Any]) -> None:
    alias = entry["alias"]
    short = {k: entry[k] for k in ("at", "actor", "action", "alias", "from_version", "to_version", "run_id")}
    short["reason"] = str(entry["reason"])[:2000]
    c.set_registered_model_tag(name, f"audit.{entry['seq']:06d}", json.dumps(short, sort_keys=True))
    c.set_registered_model_tag(name, f"last_move.{alias}", json.dumps(short, sort_keys=True))
    to = entry["to_version"]
    c.set_model_version_tag(name, to, f"{alias}.last_set", json.dumps(short, sort_keys=True))
    if entry["from_version"] and entry["from_version"] != to:
        c.set_model_version_tag(name, str(entry["from_version"]), f"{alias}.last_unset", json.dumps(short, sort_keys=True))


def _check_reason(reason: str | None, what: str) -> str:
    if reason is None or not reason.strip():
        raise ValueError(f"{what} needs a non-empty reason (--reason '...'): it is recorded in the registry history")
    return reason.strip()


def promote(ctx: "RunContext", version: str | int, *, reason: str, actor: str | None = None) -> dict[str, Any]:
    """Move alias ``production`` to ``version`` (after a healthy canary, or by hand with a reason)."""
    reason = _check_reason(reason, "promote")
    cfg = ctx.config.mlflow
    mv = get_version(cfg, cfg.registered_model, version=str(version))
    previous = aliases(cfg).get(PRODUCTION)
    entry = _move_alias(ctx, PRODUCTION, str(mv.version), action="promote", reason=reason, actor=actor)
    return {
        "changed": entry is not None and not entry.get("recovered", False),
        "model": cfg.registered_model,
        "alias": PRODUCTION,
        "from_version": previous,
        "to_version": str(mv.version),
        "entry": entry,
    }


def rollback(ctx: "RunContext", *, reason: str, actor: str | None = None) -> dict[str, Any]:
    """Move alias ``production`` back to the version that was production before the current one."""
    reason = _check_reason(reason, "rollback")
    cfg = ctx.config.mlflow
    name = cfg.registered_model
    current = aliases(cfg).get(PRODUCTION)
    if current is None:
        raise RegistryError(f"registered model {name!r} has no production version: nothing to roll back")
    stack = production_stack(history(ctx.store), name)
    if not stack or stack[-1] != current:
        raise RegistryError(
            f"alias production of {name!r} is at version {current} but the history ({HISTORY_KEY}) says "
            f"{stack[-1] if stack else 'nothing'}: it was moved outside asr-retune. "
            "Choose the version yourself: asr-retune promote --version V --reason '...'"
        )
    if len(stack) < 2:
        raise RegistryError(f"version {current} is the first production version of {name!r}: there is no previous one")
    target = stack[-2]
    get_version(cfg, name, version=target)  # still exists
    entry = _move_alias(ctx, PRODUCTION, target, action="rollback", reason=reason, actor=actor)
    return {"changed": True, "model": name, "alias": PRODUCTION, "from_version": current, "to_version": target,
            "entry": entry}


def registry_history(ctx: "RunContext") -> dict[str, Any]:
    """``asr-retune history``: every alias move plus where the aliases point now."""
    return {
        "model": ctx.config.mlflow.registered_model,
        "aliases": aliases(ctx.config.mlflow),
        "moves": [m for m in history(ctx.store) if m.get("model") == ctx.config.mlflow.registered_model],
        "history_uri": ctx.store.uri(HISTORY_KEY),
    }


__all__ = [
    "CHALLENGER",
    "PRODUCTION",
    "GateNotPassed",
    "RegisteredModel",
    "RegistryError",
    "RegistrySettings",
    "aliases",
    "code_version",
    "config_hash",
    "history",
    "lineage",
    "log_gate",
    "production_model",
    "promote",
    "register",
    "registry_history",
    "resolve_model_uri",
    "rollback",
    "training_run",
]
