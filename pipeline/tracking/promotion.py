"""Alias moves (``challenger``, ``production``) and the record of every move.

:func:`promote` and :func:`rollback` move the alias ``production``; the register stage moves
``challenger`` through :func:`move_alias`. Every move is recorded with when, who, why, from
and to: in the store (``state/registry/history.jsonl``, read by :func:`history`) and in
MLflow (registered-model tags ``audit.NNNNNN`` and ``last_*`` tags on the versions
involved). A rollback goes back to the version that was production before the current one
was promoted (the history is replayed as a stack).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
from typing import TYPE_CHECKING, Any

from pipeline.storage import ObjectStore
from pipeline.tracking.connection import client
from pipeline.tracking.models import RegistryError, aliases, get_version
from pipeline.tracking.names import PRODUCTION

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.run import RunContext

HISTORY_KEY = "state/registry/history.jsonl"


def actor(actor: str | None = None) -> str:
    """Who acts: ``actor`` if given, else ``ASR_RETUNE_ACTOR``, else the login name."""
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


def move_alias(
    ctx: RunContext, alias: str, version: str, *, action: str, reason: str, actor_name: str | None
) -> dict[str, Any] | None:
    """Point ``alias`` at ``version`` and record the move; ``None`` if it was already there (and recorded)."""
    cfg = ctx.config.mlflow
    name = cfg.registered_model
    current = aliases(cfg).get(alias)
    past = [e for e in history(ctx.store) if e.get("alias") == alias and e.get("model") == name]
    if current == version and past and past[-1].get("to_version") == version:
        return None
    recovered = current == version  # a previous attempt moved the alias but did not record it
    entry = {
        "seq": len(history(ctx.store)) + 1,
        "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "actor": actor(actor_name),
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
    c = client(cfg)
    if not recovered:
        c.set_registered_model_alias(name, alias, version)
    _record_in_mlflow(c, name, entry)
    _append_history(ctx.store, entry)
    return entry


def _record_in_mlflow(c: MlflowClient, name: str, entry: dict[str, Any]) -> None:
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


def promote(ctx: RunContext, version: str | int, *, reason: str, actor: str | None = None) -> dict[str, Any]:
    """Move alias ``production`` to ``version`` (after a healthy canary, or by hand with a reason)."""
    reason = _check_reason(reason, "promote")
    cfg = ctx.config.mlflow
    mv = get_version(cfg, cfg.registered_model, version=str(version))
    previous = aliases(cfg).get(PRODUCTION)
    entry = move_alias(ctx, PRODUCTION, str(mv.version), action="promote", reason=reason, actor_name=actor)
    return {
        "changed": entry is not None and not entry.get("recovered", False),
        "model": cfg.registered_model,
        "alias": PRODUCTION,
        "from_version": previous,
        "to_version": str(mv.version),
        "entry": entry,
    }


def rollback(ctx: RunContext, *, reason: str, actor: str | None = None) -> dict[str, Any]:
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
    entry = move_alias(ctx, PRODUCTION, target, action="rollback", reason=reason, actor_name=actor)
    return {"changed": True, "model": name, "alias": PRODUCTION, "from_version": current, "to_version": target,
            "entry": entry}


def registry_history(ctx: RunContext) -> dict[str, Any]:
    """``asr-retune history``: every alias move plus where the aliases point now."""
    return {
        "model": ctx.config.mlflow.registered_model,
        "aliases": aliases(ctx.config.mlflow),
        "moves": [m for m in history(ctx.store) if m.get("model") == ctx.config.mlflow.registered_model],
        "history_uri": ctx.store.uri(HISTORY_KEY),
    }
