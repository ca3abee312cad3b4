"""pipeline.demo.dagtest: which task failed, and the log lines shown with it."""

from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.demo.dagtest import failed_stage, tail
from pipeline.run import RunContext
from pipeline.storage import LocalStore


@pytest.fixture
def ctx(tmp_path):
    return RunContext(run_id="manual__1", config=Config(), store=LocalStore(tmp_path / "store"))


def test_the_first_unfinished_stage_is_the_failing_task(ctx):
    for stage in ("ingest", "features", "proxy"):
        ctx.mark_complete(stage, {"stage": stage})
    assert failed_stage(ctx) == "search"


def test_a_refusing_gate_is_not_a_failure_but_a_missing_deploy_is(ctx):
    for stage in ("ingest", "features", "proxy", "search", "train"):
        ctx.mark_complete(stage, {})
    ctx.mark_complete("gate", {"passed": False})
    assert failed_stage(ctx) is None  # register and deploy do not run after a refusal
    ctx.clear_stage("gate")
    ctx.mark_complete("gate", {"passed": True})
    ctx.mark_complete("register", {})
    assert failed_stage(ctx) == "deploy"


def test_tail_shows_the_last_lines_indented(tmp_path):
    log = tmp_path / "week-001.log"
    log.write_text("".join(f"line {i}\n" for i in range(40)))
    shown = tail(log, 3).splitlines()
    assert shown == ["    | line 37", "    | line 38", "    | line 39"]
    assert tail(tmp_path / "missing.log") == ""
