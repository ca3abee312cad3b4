"""Rolling serving back to the previous production version, and ``asr-retune rollback``.

:func:`rollback_serving` restores the version recorded as ``previous`` in the serving state
(its archive is kept for that); :func:`rollback` also moves MLflow alias ``production`` back.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pipeline.config import CanaryConfig, ServingConfig
from pipeline.serving.backend import ServingBackend
from pipeline.serving.router import Router
from pipeline.serving.service import open_services
from pipeline.serving.state import add_history, fetch_archive, read_serving_state, utc_now, write_serving_state
from pipeline.stages.deploy.errors import DeployError
from pipeline.stages.deploy.stage import retire, serving_lock


def rollback_serving(
    ctx: Any,
    *,
    to_version: str | None = None,
    on_restore: Callable[[str], None] | None = None,
    backend: ServingBackend | None = None,
    router: Router | None = None,
    grace_period_s: float | None = None,
    serving: ServingConfig | None = None,
    canary: CanaryConfig | None = None,
) -> dict[str, Any]:
    """Restore the previous production version in serving (TorchServe + router).

    Re-registers the kept archive (checksum verified) if needed, routes 100 % to it, makes it
    the default, records it in ``state/serving/state.json`` (the replaced version becomes
    ``previous``, so its archive stays available), calls ``on_restore(version)`` (e.g. the
    MLflow alias move back), then unregisters the replaced version after the grace period.
    ``to_version`` must be the recorded previous version (the only other archive kept).
    """
    serving, cfg, store = serving or ctx.config.serving, canary or ctx.config.canary, ctx.store
    if backend is None or router is None:
        b, r = open_services(serving)
        backend, router = backend or b, router or r
    grace = cfg.grace_period_s if grace_period_s is None else grace_period_s
    with serving_lock(serving), tempfile.TemporaryDirectory(prefix="asr-rollback-") as tmp:
        state = read_serving_state(store)
        current, previous = state.get("production"), state.get("previous")
        if to_version and current and to_version == current["version"]:
            return {"outcome": "noop", "reason": f"{to_version} is already production", "version": to_version}
        if not previous:
            raise DeployError("no previous version recorded in state/serving/state.json: nothing to roll back to")
        if to_version and to_version != previous["version"]:
            raise DeployError(f"can only roll back to the previous version {previous['version']}, not {to_version}")
        target = previous["version"]
        backend.ensure_running()
        router.ensure_running()
        if not backend.has_version(target):
            backend.register(fetch_archive(store, previous, serving.model_name, Path(tmp)))
        router.set_weights({target: 100.0})
        backend.set_default(target)
        replaced = current["version"] if current else None
        state["production"] = {**previous, "since": utc_now(), "restored": True}
        state["previous"] = current
        add_history(state, "rollback", target, replaced=replaced, run_id=ctx.run_id)
        write_serving_state(store, state)
        if on_restore is not None:
            try:
                on_restore(target)
            except Exception as exc:
                raise DeployError(
                    f"serving was rolled back to {target} (TorchServe default, router 100 %, state updated) but "
                    f"on_restore failed: {type(exc).__name__}: {exc}; move the registry alias by hand"
                ) from exc
        if replaced and replaced != target:
            retire(backend, router, replaced, serving.response_timeout_s, grace)
        return {"outcome": "restored", "version": target, "replaced": replaced, "default_version": backend.default_version()}


def rollback(ctx: Any, *, reason: str, actor: str | None = None,
             only: Literal["registry", "serving"] | None = None) -> dict[str, Any]:  # fmt: skip
    """``asr-retune rollback``: alias ``production`` back to the previous version (recorded with
    ``reason``/``actor``), then that version served again (:func:`rollback_serving`).

    ``only="registry"`` moves the alias only; ``only="serving"`` restores serving only.
    """
    if only not in (None, "registry", "serving"):
        raise ValueError(f"only must be 'registry', 'serving' or None, got {only!r}")
    result: dict[str, Any] = {}
    if only != "serving":
        from pipeline.tracking import rollback as rollback_registry

        result = rollback_registry(ctx, reason=reason, actor=actor)
    if only != "registry":
        result["serving"] = rollback_serving(ctx, to_version=result.get("to_version"))
    return result
