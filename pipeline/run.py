"""Run identity and stage transactions.

A run's artifacts live under ``runs/{run_id}/{stage}/`` of the store. A stage writes its
outputs, then marks completion last with ``_SUCCESS`` (holding its JSON summary). A
finished stage is skipped (its summary returned); a retry of an unfinished stage first
clears its own partition, so it never mixes with a failed attempt's leftovers. Data that
outlives a run lives under ``state/``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.storage import ObjectStore, join, open_store

# A run id (and a drop id): a letter or digit, then letters, digits and _.:+- (Airflow's own
# run ids fit), at most 200 characters. It names a folder of the store.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+\-]{0,199}$")
_UNSAFE_RUN_ID_CHAR = re.compile(r"[^A-Za-z0-9_.:+\-]")
# The completion marker of a stage partition; it holds the stage's JSON summary.
SUCCESS = "_SUCCESS"
# The weekly run's stages in order: each is a DAG task, a module of pipeline.stages and a
# partition runs/{run_id}/{stage}/.
STAGES = ("ingest", "features", "proxy", "search", "train", "gate", "register", "deploy")
# (stage, file) of the search's selected trial's top-rung weights: written by search, read by train.init: search
SEARCH_WEIGHTS = ("search", "chosen_weights.pt")


def new_run_id() -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"cli__{now}__{uuid.uuid4().hex[:6]}"


def store_run_id(airflow_run_id: str) -> str:
    """The store's run id for an Airflow run id.

    Airflow's ids (``manual__2026-11-28T10:00:00+00:00``, ``scheduled__...``) are kept as
    they are, so a run's folder is named after its Airflow run. Any other character is
    replaced by ``_`` and a short hash of the original is appended, so two different ids
    never share a folder.
    """
    safe = _UNSAFE_RUN_ID_CHAR.sub("_", airflow_run_id)
    if safe and safe[0].isalnum() and safe == airflow_run_id and len(safe) <= 200:
        return safe
    digest = hashlib.sha256(airflow_run_id.encode("utf-8")).hexdigest()[:12]
    head = safe.lstrip("_.:+-")[:180] or "run"
    return f"{head}__{digest}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: letters, digits and _.:+- only, at most 200 characters")
    return run_id


@dataclass
class RunContext:
    """What every stage receives: the run id, the configuration and the object store."""

    run_id: str
    config: Config
    store: ObjectStore

    @classmethod
    def create(cls, config: Config, run_id: str | None = None, root: str | None = None) -> "RunContext":
        store = open_store(root, config.storage)
        return cls(run_id=check_run_id(run_id or new_run_id()), config=config, store=store)

    def stage_prefix(self, stage: str) -> str:
        return join("runs", self.run_id, stage)

    def stage_key(self, stage: str, name: str) -> str:
        return join(self.stage_prefix(stage), name)

    def state_key(self, *parts: str) -> str:
        return join("state", *parts)

    def is_complete(self, stage: str) -> bool:
        return self.store.exists(self.stage_key(stage, SUCCESS))

    def summary(self, stage: str) -> dict[str, Any]:
        return json.loads(self.store.get_text(self.stage_key(stage, SUCCESS)))

    def mark_complete(self, stage: str, summary: dict[str, Any]) -> None:
        self.store.put_text(self.stage_key(stage, SUCCESS), json.dumps(summary, indent=2, sort_keys=True))

    def clear_stage(self, stage: str) -> int:
        return self.store.delete_prefix(self.stage_prefix(stage) + "/")

    def run_stage(self, stage: str, body: Callable[[], dict[str, Any]], force: bool = False) -> dict[str, Any]:
        """Run ``body`` as a transaction on the stage's partition; skip it if already complete."""
        if self.is_complete(stage) and not force:
            summary = self.summary(stage)
            summary["skipped"] = True
            return summary
        self.clear_stage(stage)
        summary = body()
        summary = {**summary, "run_id": self.run_id, "stage": stage}
        self.mark_complete(stage, summary)
        return {**summary, "skipped": False}
