"""Lineage of a pipeline run: the tags that say what a model was built from.

Pool version, golden-set version, config hash, code version and run id, set on the
training run and on every registered version.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import TYPE_CHECKING, Any

from pipeline.config import PROJECT_ROOT, Config
from pipeline.storage import ObjectStore
from pipeline.tracking.names import (
    TAG_CODE,
    TAG_CONFIG_HASH,
    TAG_GOLDEN,
    TAG_POOL,
    TAG_RUN_ID,
)

if TYPE_CHECKING:
    from pipeline.run import RunContext


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


def read_json(store: ObjectStore, key: str) -> Any:
    """The JSON object at ``key``; ``None`` when there is none."""
    return json.loads(store.get_text(key)) if store.exists(key) else None


def _pool_version(ctx: RunContext, metrics: dict[str, Any], meta: dict[str, Any]) -> Any:
    """From train's metrics, else the model's metadata, else the first stage summary that names it."""
    pool = metrics.get("pool_version") or meta.get("pool_version") or (meta.get("lineage") or {}).get("pool_version")
    if pool:
        return pool
    for stage in ("train", "features", "ingest"):
        if ctx.is_complete(stage):
            pool = ctx.summary(stage).get("pool_version")
            if pool:
                return pool
    return None


def lineage_tags(ctx: RunContext, model_meta: dict[str, Any] | None = None) -> dict[str, str]:
    """Lineage tags of a pipeline run: pool version, golden version, config hash, code version, run id."""
    metrics = read_json(ctx.store, ctx.stage_key("train", "metrics.json")) or {}
    pool = _pool_version(ctx, metrics, model_meta or {})
    decision = read_json(ctx.store, ctx.stage_key("gate", "decision.json")) or {}
    golden = (decision.get("golden") or {}).get("version") or getattr(getattr(ctx.config, "gate", None), "golden_version", None)
    golden = golden or ctx.config.demo.golden_version
    return {
        TAG_RUN_ID: ctx.run_id,
        TAG_POOL: str(pool or "unknown"),
        TAG_GOLDEN: str(golden),
        TAG_CONFIG_HASH: config_hash(ctx.config),
        TAG_CODE: code_version(),
    }
