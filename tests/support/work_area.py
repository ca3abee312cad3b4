"""What a run's Ray experiments have written to its work area (``runs/ID/_work/``), read the way the
reliability scenarios watch a search or a DDP training in progress."""

from __future__ import annotations

import glob
import json
import os

from pipeline.run import RunContext


def tune_dir(ctx: RunContext):
    """The search's Tune experiment in the run's work area: one folder per trial."""
    return ctx.store.base / "runs" / ctx.run_id / "_work" / "search" / "tune"


def trial_checkpoints(ctx: RunContext, trial: str) -> int:
    """Checkpoints trial folder ``trial`` holds (one per rung; its worker writes them to the work area at once,
    unlike result.json, which arrives with Tune's next experiment snapshot)."""
    return len(glob.glob(str(tune_dir(ctx) / trial / "checkpoint_*")))


def trial_results(ctx: RunContext) -> dict[str, list[dict]]:
    """Per trial directory name, the results it reported so far (Tune's result.json lines in the work area)."""
    base = tune_dir(ctx)
    out = {}
    for path in glob.glob(str(base / "*" / "result.json")):
        rows = []
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line being written
        out[os.path.basename(os.path.dirname(path))] = rows
    return out


def train_checkpoints(ctx: RunContext) -> list[str]:
    """The DDP training's checkpoint folders written so far (not the controller's checkpoint_manager_snapshot.json)."""
    base = ctx.store.base / "runs" / ctx.run_id / "_work" / "train" / "ddp"
    return sorted(p for p in glob.glob(str(base / "checkpoint_*")) if os.path.isdir(p))


def registered_checkpoints(ctx: RunContext) -> int:
    """Checkpoints Ray Train's controller has registered (its snapshot; it polls the workers every 2 s)."""
    path = ctx.store.base / "runs" / ctx.run_id / "_work" / "train" / "ddp" / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(path.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0
