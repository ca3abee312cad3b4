"""Stage ``deploy``: ship a gated candidate through a canary, then promote it or roll it back.

``deploy(ctx, candidate_model_key=...)``:

1. builds the ``.mar`` (exported model + self-contained handler), keeps it as the stage's
   artifact ``runs/{run_id}/deploy/{model}-{version}.mar`` and verifies its sha256 before
   TorchServe registers it;
2. starts TorchServe if needed and makes sure production is registered (re-registering it
   from ``state/serving/archives/`` after a server restart); with no production yet it is a
   **cold start**: the candidate is registered, made default and routed 100 %, recorded as
   ``promoted`` with reason ``cold_start``;
3. registers the candidate as a new version beside production and steps the router's
   weight (``canary.steps``, e.g. 5 -> 25 -> 100 %), addressing both versions explicitly;
4. in every analysis interval replays held-out labeled audio through the router, with paired
   requests sent to both versions (:mod:`pipeline.stages.deploy.replay`), and measures and
   checks each version (:mod:`pipeline.stages.deploy.analysis`). A step needs
   ``intervals_per_step`` passing intervals, and ``max_consecutive_failures`` failing
   intervals in a row roll back (one blip does not): :func:`run_steps`;
5. healthy: the candidate takes 100 %, becomes TorchServe's default, ``on_promote(version)``
   is called (the MLflow alias move), and the old version is unregistered once the router
   has drained its in-flight requests and ``grace_period_s`` has passed (its archive is kept
   for :func:`~pipeline.stages.deploy.rollback.rollback_serving`); unhealthy: weight back to 0, in-flight requests drained,
   candidate unregistered, production untouched.

``runs/{run_id}/deploy/canary.json`` records the outcome (``promoted``/``rolled_back``), the
reason and every interval's measurements. Serving state that outlives runs is
:mod:`pipeline.serving.state`.

Entry points: :func:`deploy_registered` (the DAG task) and :func:`deploy_model` (``asr-retune
deploy``); rolling back by hand is :mod:`pipeline.stages.deploy.rollback`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.config import CanaryConfig, ServingConfig
from pipeline.serving.archive import ModelArchive, build_archive, check_version
from pipeline.serving.backend import ServingBackend
from pipeline.serving.router import Router
from pipeline.serving.service import open_services
from pipeline.serving.state import (
    PROMOTED,
    ROLLED_BACK,
    add_history,
    fetch_archive,
    read_serving_state,
    record_promotion,  # fmt: skip
    utc_now,
    write_serving_state,
)
from pipeline.stages.deploy.analysis import measure_interval
from pipeline.stages.deploy.errors import DeployError
from pipeline.stages.deploy.replay import ReplayUtterance, load_replay_set
from pipeline.storage import sha256_file

STAGE = "deploy"
CANARY_FILE = "canary.json"


@contextlib.contextmanager
def serving_lock(serving: ServingConfig) -> Iterator[None]:
    """One deploy or rollback at a time per serving work dir."""
    work = serving.work_path()
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "deploy.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeployError(f"another deploy or rollback is running (lock {work / 'deploy.lock'}); wait for it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# the control loop


def run_steps(
    cfg: CanaryConfig,
    apply_weight: Callable[[float], None],
    measure: Callable[[float, int], dict[str, Any]],
) -> tuple[str, str, list[dict[str, Any]]]:
    """The canary's control loop, free of I/O: ``(outcome, reason, steps)``.

    ``measure(weight, interval_index)`` returns an interval's measurements with ``passed``
    and ``checks``. A step is left after ``intervals_per_step`` passing intervals;
    ``max_consecutive_failures`` failing intervals in a row (across steps) roll back.
    """
    steps: list[dict[str, Any]] = []
    consecutive = 0
    index = 0
    for weight in cfg.steps:
        apply_weight(weight)
        step = {"weight": weight, "intervals": [], "started_at": utc_now()}
        steps.append(step)
        passes = 0
        while passes < cfg.intervals_per_step:
            m = measure(weight, index)
            index += 1
            step["intervals"].append(m)
            if m["passed"]:
                passes += 1
                consecutive = 0
                continue
            consecutive += 1
            if consecutive >= cfg.max_consecutive_failures:
                failed = sorted({c["check"] for c in m["checks"] if not c["passed"]})
                step["result"] = "failed"
                return ROLLED_BACK, f"{consecutive} consecutive failing intervals at {weight:g}%: {', '.join(failed)}", steps
        step["result"] = "passed"
    return PROMOTED, "healthy at every step", steps


# --------------------------------------------------------------------------------------
# serving moves


def _ensure_weights(router: Router, weights: dict[str, float]) -> None:
    if router.weights() != weights:
        router.set_weights(weights)


def retire(backend: ServingBackend, router: Router, version: str, drain_s: float, grace_s: float = 0.0) -> bool:
    """Unregister a version that no longer gets traffic, once the router has drained its requests."""
    drained = router.wait_drained(drain_s)
    if grace_s > 0:
        time.sleep(grace_s)
    backend.unregister(version)
    return drained


def _abort(backend: ServingBackend, router: Router, production: str, candidate: str, drain_s: float = 60.0) -> None:
    """Weight back to 0, in-flight requests drained, the candidate unregistered; production untouched."""
    router.set_weights({production: 100.0})
    retire(backend, router, candidate, drain_s)


def _revert_promotion(backend: ServingBackend, router: Router, production: str, candidate: str) -> None:
    router.set_weights({production: 100.0})
    backend.set_default(production)
    retire(backend, router, candidate, 60.0)


def _revert_cold_start(backend: ServingBackend, router: Router, candidate: str) -> None:
    router.set_weights({})
    retire(backend, router, candidate, 60.0)


def _best_effort(record: dict[str, Any], what: str, fn: Callable[[], None]) -> None:
    """Run a clean-up step; a failure is recorded (and must not hide the error being handled)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        record.setdefault("cleanup_errors", []).append(f"{what}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------
# the stage


def _derive_version(run_id: str, model_sha: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-._")[:40] or "run"
    return f"{base}-{model_sha[:8]}"


def _load_export_meta(path: Path) -> dict[str, Any]:
    from pipeline.asr.export import load_exported

    try:
        return dict(load_exported(path).meta)
    except ValueError as exc:
        raise DeployError(f"the candidate is not a deployable export: {exc}") from None


def _summary(record: dict[str, Any], uri: str, store: Any) -> dict[str, Any]:
    return {
        "outcome": record["outcome"],
        "reason": record["reason"],
        "version": record["candidate"]["version"],
        "production_version": (record.get("production") or {}).get("version"),
        "default_version": record.get("default_version"),
        "canary_json": uri,
        "archive": store.uri(record["candidate"]["archive_key"]),
        "archive_sha256": record["candidate"]["archive_sha256"],
        "steps": [
            {"weight": s["weight"], "result": s.get("result"), "intervals": len(s["intervals"])} for s in record.get("steps", [])
        ],
        "duration_s": record.get("duration_s"),
    }


class _Deployment:
    """One deploy of one candidate: its steps, and the record (canary.json) they fill in."""

    def __init__(self, ctx: Any, backend: ServingBackend, router: Router, serving: ServingConfig, cfg: CanaryConfig,
                 on_promote: Callable[[str], None] | None) -> None:  # fmt: skip
        self.ctx, self.store, self.backend, self.router = ctx, ctx.store, backend, router
        self.serving, self.cfg, self.on_promote = serving, cfg, on_promote
        self.record: dict[str, Any] = {"run_id": ctx.run_id, "started_at": utc_now(), "config": cfg.model_dump(mode="json"),
                                       "steps": []}  # fmt: skip
        self.timings: dict[str, float] = {}
        self.started = time.monotonic()

    def run(self, model_key: str, version: str | None, handler_options: dict[str, Any] | None) -> dict[str, Any]:
        """Archive, production up, then nothing to do, a cold start or a canary; the stage summary."""
        with serving_lock(self.serving), tempfile.TemporaryDirectory(prefix="asr-deploy-") as tmp:
            archive = self.build_candidate(model_key, version, handler_options, Path(tmp))
            prod_rec, state, registered = self.start_production(Path(tmp) / "restore")
            production = prod_rec["version"] if prod_rec else None
            if production == archive.version:
                return self.finish(outcome=PROMOTED, reason="already_in_production")
            if archive.version in registered:  # left over from an interrupted deploy: start clean
                _ensure_weights(self.router, {production: 100.0} if production else {})
                self.backend.unregister(archive.version)
            if production is None:
                return self.cold_start(archive, state)
            return self.canary(archive, prod_rec, state)

    # -- the record ------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Record how long ``step`` took (only when it succeeds)."""
        t = time.monotonic()
        yield
        self.timings[step] = time.monotonic() - t

    def write_record(self) -> str:
        self.record["finished_at"] = utc_now()
        self.record["duration_s"] = round(time.monotonic() - self.started, 3)
        self.record["timings_s"] = {k: round(v, 3) for k, v in self.timings.items()}
        key = self.ctx.stage_key(STAGE, CANARY_FILE)
        self.store.put_text(key, json.dumps(self.record, indent=2, sort_keys=True, default=str))
        return self.store.uri(key)

    def finish(self, **outcome: Any) -> dict[str, Any]:
        self.record.update(outcome)
        return _summary(self.record, self.write_record(), self.store)

    def fail(self, what: str, cleanup: Callable[[], None], reason: str, **fields: Any) -> None:
        """A step failed: undo it (best effort) and record the rollback; the caller raises."""
        _best_effort(self.record, what, cleanup)
        self.record.update(outcome=ROLLED_BACK, reason=reason, **fields)
        self.write_record()

    @property
    def archive_key(self) -> str:
        return self.record["candidate"]["archive_key"]

    # -- the steps -------------------------------------------------------------------------
    def build_candidate(self, model_key: str, version: str | None, handler_options: dict[str, Any] | None,
                        tmp: Path) -> ModelArchive:  # fmt: skip
        """The candidate's .mar, kept as the stage's artifact."""
        with self.timed("archive"):
            model_path = tmp / "model.pt"
            self.store.download_file(model_key, model_path)
            meta = _load_export_meta(model_path)
            model_sha = sha256_file(model_path)
            version = check_version(version or _derive_version(self.ctx.run_id, model_sha))
            options = {**self.serving.handler_options(), **(handler_options or {})}
            archive = build_archive(model_path, tmp / "mar", model_name=self.serving.model_name, version=version,
                                    handler_options=options)  # fmt: skip
            archive_key = self.ctx.stage_key(STAGE, archive.file_name)
            self.store.upload_file(archive_key, archive.path)
        self.record["candidate"] = {
            "version": version, "model_key": model_key, "model_sha256": model_sha,
            "archive_key": archive_key, "archive_sha256": archive.sha256, "archive_bytes": archive.size,
            "export_meta": {k: meta.get(k) for k in ("version", "sample_rate", "format") if k in meta},
        }  # fmt: skip
        return archive

    def start_production(self, tmp: Path) -> tuple[dict[str, Any] | None, dict[str, Any], set[str]]:
        """Servers up, production registered; ``(production record, serving state, registered versions)``.

        After a server restart production is re-registered from its kept archive; with no
        recorded production, the backend's default version (deployed by hand) is adopted.
        """
        with self.timed("servers"):
            self.backend.ensure_running()
            self.router.ensure_running()
        state = read_serving_state(self.store)
        prod_rec = state.get("production")
        registered = {v.version for v in self.backend.versions()}
        if prod_rec and prod_rec["version"] not in registered:
            with self.timed("restore_production"):
                self.backend.register(fetch_archive(self.store, prod_rec, self.serving.model_name, tmp))
                self.backend.set_default(prod_rec["version"])
            registered.add(prod_rec["version"])
        if not prod_rec:
            adopted = self.backend.default_version()
            if adopted:
                prod_rec = {"version": adopted, "archive_key": None, "sha256": None, "since": utc_now(), "adopted": True}
        self.record["production"] = prod_rec
        return prod_rec, state, registered

    def cold_start(self, archive: ModelArchive, state: dict[str, Any]) -> dict[str, Any]:
        """No production yet: the candidate takes all traffic at once."""
        version = archive.version
        try:
            with self.timed("register_candidate"):
                self.backend.register(archive)
                self.backend.set_default(version)
                self.router.set_weights({version: 100.0})
            if self.on_promote is not None:
                self.on_promote(version)
        except Exception as exc:
            self.fail("revert cold start", lambda: _revert_cold_start(self.backend, self.router, version),
                      f"cold start reverted: {type(exc).__name__}: {exc}")  # fmt: skip
            raise DeployError(f"cold start of {version} failed and was reverted: {type(exc).__name__}: {exc}") from exc
        record_promotion(self.store, state, archive, run_archive_key=self.archive_key, run_id=self.ctx.run_id, previous=None)
        return self.finish(outcome=PROMOTED, reason="cold_start", default_version=version)

    def canary(self, archive: ModelArchive, prod_rec: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """The candidate beside production, stepped through ``canary.steps``; then promoted or rolled back."""
        production, version, cfg = prod_rec["version"], archive.version, self.cfg
        utts = load_replay_set(self.store, cfg.golden_version or self.ctx.config.demo.golden_version, cfg.replay_utterances,
                               cfg.seed)  # fmt: skip
        _ensure_weights(self.router, {production: 100.0})
        try:
            with self.timed("register_candidate"):
                self.backend.register(archive)
            with self.timed("canary"):
                outcome, reason, steps = self.step_through(utts, production, version)
        except BaseException as exc:  # incl. KeyboardInterrupt: never leave a canary taking traffic
            drain_s = self.serving.response_timeout_s
            self.fail("abort canary", lambda: _abort(self.backend, self.router, production, version, drain_s),
                      f"error: {type(exc).__name__}: {exc}")  # fmt: skip
            raise
        self.record["steps"] = steps
        if outcome == ROLLED_BACK:
            return self.roll_back(version, production, state, reason)
        return self.promote(archive, prod_rec, state, reason)

    def step_through(self, utts: list[ReplayUtterance], production: str, candidate: str) -> tuple[str, str, list[dict[str, Any]]]:
        """:func:`run_steps` on the real router and backend: ``(outcome, reason, steps)``."""

        def apply_weight(weight: float) -> None:
            split = {candidate: 100.0} if weight >= 100 else {production: 100.0 - weight, candidate: weight}
            self.router.set_weights(split)

        def measure(weight: float, index: int) -> dict[str, Any]:
            return measure_interval(self.backend, self.router, utts, production=production, candidate=candidate,
                                    cfg=self.cfg, weight=weight, index=index)  # fmt: skip

        return run_steps(self.cfg, apply_weight, measure)

    def roll_back(self, version: str, production: str, state: dict[str, Any], reason: str) -> dict[str, Any]:
        """An unhealthy canary: weight back to 0, candidate unregistered, production untouched."""
        with self.timed("rollback"):
            _abort(self.backend, self.router, production, version, self.serving.response_timeout_s)
        add_history(state, "canary", version, outcome=ROLLED_BACK, run_id=self.ctx.run_id, reason=reason)
        write_serving_state(self.store, state)
        return self.finish(outcome=ROLLED_BACK, reason=reason, default_version=production)

    def promote(self, archive: ModelArchive, prod_rec: dict[str, Any], state: dict[str, Any], reason: str) -> dict[str, Any]:
        """A healthy canary: the candidate takes 100 % and becomes the default; the old version retires."""
        production, version = prod_rec["version"], archive.version
        with self.timed("promote"):
            try:
                self.router.set_weights({version: 100.0})
                self.backend.set_default(version)
                if self.on_promote is not None:
                    self.on_promote(version)
            except Exception as exc:
                self.fail("revert promotion", lambda: _revert_promotion(self.backend, self.router, production, version),
                          f"promotion reverted: {type(exc).__name__}: {exc}", default_version=production)  # fmt: skip
                raise DeployError(
                    f"promoting {version} failed and serving was switched back to {production}: {type(exc).__name__}: {exc}"
                ) from exc
            record_promotion(self.store, state, archive, run_archive_key=self.archive_key, run_id=self.ctx.run_id,
                             previous=prod_rec)  # fmt: skip
        promoted_at = utc_now()
        # requests still in flight to the old version finish (router drain), then the grace period
        drained = retire(self.backend, self.router, production, self.serving.response_timeout_s, self.cfg.grace_period_s)
        return self.finish(outcome=PROMOTED, reason=reason, default_version=version, promoted_at=promoted_at,
                           old_version_drained=drained, unregistered=production)  # fmt: skip


def deploy(
    ctx: Any,
    *,
    candidate_model_key: str,
    version: str | None = None,
    on_promote: Callable[[str], None] | None = None,
    backend: ServingBackend | None = None,
    router: Router | None = None,
    handler_options: dict[str, Any] | None = None,
    serving: ServingConfig | None = None,
    canary: CanaryConfig | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Stage ``deploy``: canary the exported model at ``candidate_model_key`` (a store key).

    ``version``: the TorchServe version name (default: derived from the run id and the
    model's checksum). ``on_promote(version)`` runs after the candidate became TorchServe's
    default (the MLflow alias move); if it raises, serving is switched back to the previous
    production and :class:`DeployError` is raised (the stage stays incomplete, a retry
    canaries again). ``handler_options`` are merged into the archive's handler_config.json
    (fault-injection knobs for tests). ``serving``/``canary`` override the configuration's
    sections. Returns the stage summary; a completed stage is skipped.
    """
    serving = serving or ctx.config.serving
    canary = canary or ctx.config.canary

    def body() -> dict[str, Any]:
        b, r = backend, router
        if b is None or r is None:
            ob, orr = open_services(serving)
            b, r = b or ob, r or orr
        return _Deployment(ctx, b, r, serving, canary, on_promote).run(candidate_model_key, version, handler_options)

    return ctx.run_stage(STAGE, body, force=force)


# --------------------------------------------------------------------------------------
# entry points: the DAG task and the CLI


def _promote_on_healthy_canary(ctx: Any) -> Callable[[str], None]:
    """``on_promote`` that moves MLflow alias ``production`` (recorded, with the canary as the reason)."""
    from pipeline.tracking import promote

    def on_promote(version: str) -> None:
        promote(ctx, version, reason=f"canary healthy in run {ctx.run_id}", actor="canary")

    return on_promote


def deploy_registered(ctx: Any, *, steps: list[float] | None = None, force: bool = False) -> dict[str, Any]:
    """Stage ``deploy`` of the weekly run: canary the version this run registered; on a healthy
    canary, move MLflow alias ``production`` to it (recorded, with the canary as the reason).

    ``steps`` (e.g. the DAG's ``canary_steps`` param) replaces ``canary.steps`` for this deploy
    only, validated like the configuration; the configuration object is not changed.
    """
    on_promote = _promote_on_healthy_canary(ctx)
    canary = None
    if steps is not None:
        try:
            canary = CanaryConfig.model_validate({**ctx.config.canary.model_dump(), "steps": steps})
        except ValidationError as exc:
            raise DeployError(f"invalid canary steps {steps}: {exc.errors()[0]['msg']}") from None
    if not ctx.is_complete("register"):
        raise DeployError(f"run {ctx.run_id!r} registered no model: run the register stage first")
    version = str(ctx.summary("register")["version"])
    return deploy(ctx, candidate_model_key=ctx.stage_key("train", "model.pt"), version=version, on_promote=on_promote,
                  canary=canary, force=force)  # fmt: skip


def deploy_model(ctx: Any, *, model_key: str | None = None, version: str | None = None, force: bool = False) -> dict[str, Any]:
    """``asr-retune deploy``: the version this run registered (:func:`deploy_registered`), or, given
    ``model_key`` (default: the run's trained model) or ``version``, that export as that version.
    A healthy canary moves MLflow alias ``production`` to it."""
    if not model_key and not version:
        return deploy_registered(ctx, force=force)
    return deploy(ctx, candidate_model_key=model_key or ctx.stage_key("train", "model.pt"), version=version,
                  on_promote=_promote_on_healthy_canary(ctx), force=force)  # fmt: skip
