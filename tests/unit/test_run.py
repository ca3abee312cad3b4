import json

import pytest

from pipeline.config import Config
from pipeline.run import STAGES, RunContext, check_run_id, new_run_id, store_run_id


def make_ctx(tmp_path, run_id="r1"):
    return RunContext.create(Config(), run_id=run_id, root=str(tmp_path / "store"))


def test_stage_runs_once_then_is_skipped(tmp_path):
    ctx = make_ctx(tmp_path)
    calls = []

    def body():
        calls.append(1)
        ctx.store.put_text(ctx.stage_key("s", "out.txt"), "x")
        return {"n": 1}

    first = ctx.run_stage("s", body)
    second = ctx.run_stage("s", body)
    assert calls == [1]
    assert first["skipped"] is False and second["skipped"] is True
    assert second["n"] == 1 and second["run_id"] == "r1"
    assert json.loads(ctx.store.get_text("runs/r1/s/_SUCCESS"))["n"] == 1


def test_failed_stage_is_not_marked_and_retry_clears_leftovers(tmp_path):
    ctx = make_ctx(tmp_path)

    def failing():
        ctx.store.put_text(ctx.stage_key("s", "half.txt"), "partial")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        ctx.run_stage("s", failing)
    assert not ctx.is_complete("s")

    def good():
        ctx.store.put_text(ctx.stage_key("s", "full.txt"), "ok")
        return {}

    ctx.run_stage("s", good)
    assert sorted(ctx.store.list("runs/r1/s/")) == ["runs/r1/s/_SUCCESS", "runs/r1/s/full.txt"]


def test_runs_are_partitioned(tmp_path):
    a, b = make_ctx(tmp_path, "a"), make_ctx(tmp_path, "b")
    a.run_stage("s", lambda: {"who": "a"})
    assert not b.is_complete("s")
    assert b.run_stage("s", lambda: {"who": "b"})["who"] == "b"


def test_run_ids():
    assert check_run_id(new_run_id())
    assert check_run_id("scheduled__2026-11-28T00:00:00+00:00")
    for bad in ["", "../x", "a/b", "a b"]:
        with pytest.raises(ValueError, match="invalid run id"):
            check_run_id(bad)


@pytest.mark.parametrize("airflow_id", [
    "manual__2026-11-28T10:00:00+00:00",
    "scheduled__2026-11-30T03:00:00+00:00",
    "manual__2026-11-28T18:01:21.101798+00:00",
    "asset_triggered__2026-12-01T00:00:00+00:00",
])
def test_airflow_run_ids_are_kept_as_they_are(airflow_id):
    assert store_run_id(airflow_id) == check_run_id(airflow_id)


@pytest.mark.parametrize("airflow_id", ["my run/with slash", "  weird id ", "__leading", "ünïcode-run", "x" * 250])
def test_other_run_ids_are_made_safe_and_stay_distinct(airflow_id):
    safe = store_run_id(airflow_id)
    assert check_run_id(safe) == safe
    assert store_run_id(airflow_id + "!") != safe


def test_every_stage_is_a_module_of_pipeline_stages():
    import importlib

    for stage in STAGES:
        assert importlib.import_module(f"pipeline.stages.{stage}").__name__ == f"pipeline.stages.{stage}"
