"""The serving state that outlives runs: ``state/serving/state.json`` and the archives it keeps.

``state.json`` names ``production`` and ``previous`` (version, archive key, sha256, since) and
keeps a ``history`` of the last promotions, rollbacks and rolled-back canaries. Only the
archives of those two versions stay under ``state/serving/archives/``: a restarted server
re-registers production from there, and a rollback restores the previous version.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from pipeline.serving.archive import ModelArchive, archive_name, verify_archive
from pipeline.serving.backend import ServingError
from pipeline.storage import ObjectStore, join

STATE_KEY = "state/serving/state.json"
ARCHIVE_PREFIX = "state/serving/archives"
PROMOTED, ROLLED_BACK = "promoted", "rolled_back"
HISTORY_MAX = 100


def utc_now() -> str:
    """The current UTC time as recorded in the state and the canary record (ISO 8601, seconds)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_serving_state(store: ObjectStore) -> dict[str, Any]:
    if not store.exists(STATE_KEY):
        return {"production": None, "previous": None, "history": []}
    return json.loads(store.get_text(STATE_KEY))


def write_serving_state(store: ObjectStore, state: dict[str, Any]) -> None:
    state["history"] = state.get("history", [])[-HISTORY_MAX:]
    store.put_text(STATE_KEY, json.dumps(state, indent=2, sort_keys=True))


def add_history(state: dict[str, Any], action: str, version: str, **fields: Any) -> None:
    """Append one event (``promote``, ``canary``, ``rollback``) to the state's history."""
    state.setdefault("history", []).append({"time": utc_now(), "action": action, "version": version, **fields})


def _prune_archives(store: ObjectStore, state: dict[str, Any]) -> None:
    keep = {r["archive_key"] for r in (state.get("production"), state.get("previous")) if r and r.get("archive_key")}
    for key in list(store.list(ARCHIVE_PREFIX + "/")):
        if key not in keep:
            store.delete(key)


def record_promotion(store: ObjectStore, state: dict[str, Any], archive: ModelArchive, *, run_archive_key: str,
                     run_id: str, previous: dict[str, Any] | None) -> None:  # fmt: skip
    """Keep ``archive`` as production's (``previous`` becomes the rollback target), write the state, prune."""
    key = join(ARCHIVE_PREFIX, archive.file_name)
    store.upload_file(key, archive.path)
    state["previous"] = previous if previous and previous.get("archive_key") else None
    state["production"] = {"version": archive.version, "archive_key": key, "sha256": archive.sha256, "since": utc_now(),
                           "run_id": run_id, "run_archive_key": run_archive_key}  # fmt: skip
    add_history(state, "promote", archive.version, outcome=PROMOTED, run_id=run_id)
    write_serving_state(store, state)
    _prune_archives(store, state)


def fetch_archive(store: ObjectStore, record: dict[str, Any], model_name: str, local_dir: Path) -> ModelArchive:
    """Download a kept archive and verify it against the checksum recorded when it was built."""
    if not record.get("archive_key"):
        raise ServingError(f"version {record.get('version')} has no kept archive; it cannot be re-registered")
    local_dir.mkdir(parents=True, exist_ok=True)
    path = local_dir / archive_name(model_name, record["version"])
    store.download_file(record["archive_key"], path)
    verify_archive(path, record["sha256"])
    return ModelArchive(str(path), model_name, record["version"], record["sha256"], path.stat().st_size)
