"""Heavy stages as Ray Jobs on a real local cluster (a head and one spot worker on 127.0.0.1): a stage
submitted as a job runs the CLI there, its log reaches the caller, its id is recorded; a second caller
re-attaches to the running job (one job in all); a failed job is resubmitted as the next attempt."""

from __future__ import annotations

import json
import threading
import time

import pytest
from support.job_cluster import demo_run, gated_entrypoint, job_config, jobs_of, running_cluster, write_config

from pipeline.config import Config, RayConfig
from pipeline.jobs import (
    JobError,
    JobFailed,
    job_client,
    job_entrypoint,
    job_env,
    read_job_record,
    run_heavy_stage,
    submission_id,
    submit_stage,
)
from pipeline.run import RunContext
from pipeline.stages.ingest.stage import ingest
from pipeline.storage import open_store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


# --- without a cluster ------------------------------------------------------------------------


def test_submission_ids_are_deterministic_per_run_stage_and_attempt():
    run = "manual__2026-11-28T10:00:00+00:00"
    assert submission_id(run, "search") == submission_id(run, "search")
    assert submission_id(run, "search", 2) == submission_id(run, "search") + "-2"
    assert submission_id(run, "search") != submission_id(run, "train")
    assert submission_id("a:b", "search") != submission_id("a+b", "search")  # same slug, other hash
    assert set(submission_id(run, "search")) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def test_driver_mode_calls_the_stage_in_process(tmp_path):
    ctx = RunContext(run_id="r", config=Config(), store=open_store(str(tmp_path)))
    assert run_heavy_stage(ctx, "search", lambda: {"where": "here"}, ["--trials", "1"]) == {"where": "here"}


def test_job_mode_needs_a_cluster_and_the_same_config(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="submit: job runs stages on a Ray cluster, but address is null"):
        RayConfig(submit="job")
    config = job_config(tmp_path)
    ctx = RunContext(run_id="r1", config=config, store=open_store(str(tmp_path / "store")))
    with pytest.raises(JobError, match="none is up .* run `asr-retune cluster up`"):
        submit_stage(ctx, "proxy")
    entry = job_entrypoint(ctx, "train", ["--hparams-json", '{"lr": 0.001}'])
    assert entry.endswith("""train --run-id r1 --root %s --quiet --json --hparams-json '{"lr": 0.001}'""" % ctx.store.root)
    path = write_config(config, tmp_path / "config.yaml")
    monkeypatch.setenv("ASR_RETUNE__TRAIN__EPOCHS", "3")
    with pytest.raises(JobError, match="whose train differ from this run's configuration"):
        job_env(ctx, path)
    monkeypatch.delenv("ASR_RETUNE__TRAIN__EPOCHS")
    monkeypatch.setenv("ASR_RETUNE__DEMO__SEED", str(config.demo.seed))  # an override the file agrees with
    env = job_env(ctx, path)
    assert env == {"ASR_RETUNE_CONFIG": str(path.resolve()), "ASR_RETUNE__DEMO__SEED": str(config.demo.seed)}


# --- on the local cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-jobs")
    config = job_config(tmp)
    t0 = time.monotonic()
    with running_cluster(config) as status:
        assert status["up"]
        print(f"cluster up in {time.monotonic() - t0:.1f} s")
        yield config, tmp


def test_failed_job_is_resubmitted_and_the_second_succeeds_with_logs_and_id(cluster, monkeypatch):
    config, tmp = cluster
    monkeypatch.setenv("ASR_RETUNE_CONFIG", str(write_config(config, tmp / "plain.yaml")))
    ctx = demo_run(config, tmp / "store-a", "jobs-a", ingested=False)  # no pool yet: proxy fails
    client = job_client(config)
    lines: list[str] = []

    t0 = time.monotonic()
    with pytest.raises(JobFailed, match=r"attempt 1\) ended FAILED: .*a retry submits the next attempt"):
        submit_stage(ctx, "proxy", echo=lines.append, poll_s=0.5)
    first = time.monotonic() - t0
    assert any("FileNotFoundError" in line or "pool" in line for line in lines), lines[-5:]  # its log came back
    record = read_job_record(ctx, "proxy")
    assert record["attempt"] == 1 and record["status"] == "FAILED"
    assert record["submission_id"] == submission_id("jobs-a", "proxy")

    ingest(ctx, progress=False)  # what the failed attempt lacked
    lines.clear()
    t0 = time.monotonic()
    try:
        summary = submit_stage(ctx, "proxy", echo=lines.append, poll_s=0.5)
    except JobFailed as exc:
        pytest.fail(f"{exc}; its log ends: {lines[-8:]}")
    second = time.monotonic() - t0
    sid2 = submission_id("jobs-a", "proxy", 2)
    assert summary["job_id"] == sid2 and summary["job_attempt"] == 2 and not summary["skipped"]
    assert summary["train_size"] > 0 and summary["stage"] == "proxy"
    assert ctx.summary("proxy")["job_id"] == sid2  # the _SUCCESS summary carries it
    start = lines.index("{")  # the CLI's --json result, through the log
    printed = json.loads("\n".join(lines[start:lines.index("}", start) + 1]))
    assert printed["train_size"] == summary["train_size"] and printed["stage"] == "proxy"
    record = read_job_record(ctx, "proxy")
    assert record["status"] == "SUCCEEDED" and record["attempts"] == [
        {"attempt": 1, "submission_id": submission_id("jobs-a", "proxy"), "status": "FAILED"}]
    jobs = {j.submission_id: str(j.status) for j in jobs_of(client, "jobs-a", "proxy")}
    assert jobs == {submission_id("jobs-a", "proxy"): "FAILED", sid2: "SUCCEEDED"}

    again = submit_stage(ctx, "proxy", echo=lines.append)  # complete: skipped, no third job
    assert again["skipped"] and again["job_id"] == sid2 and len(jobs_of(client, "jobs-a", "proxy")) == 2
    print(f"failed job {first:.1f} s, resubmitted job {second:.1f} s")


def test_second_caller_reattaches_to_the_running_job(cluster, monkeypatch):
    config, tmp = cluster
    gate = tmp / "gate-b"
    held = config.model_copy(deep=True)
    held.ray.job_entrypoint = gated_entrypoint(gate)
    monkeypatch.setenv("ASR_RETUNE_CONFIG", str(write_config(held, tmp / "held.yaml")))
    ctx = demo_run(held, tmp / "store-b", "jobs-b")
    client = job_client(held)
    sid = submission_id("jobs-b", "features")
    results: dict[str, object] = {}
    logs: dict[str, list[str]] = {"first": [], "second": []}

    def call(name: str) -> None:
        try:
            results[name] = submit_stage(ctx, "features", echo=logs[name].append, poll_s=0.5)
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            results[name] = exc

    first = threading.Thread(target=call, args=("first",), daemon=True)
    first.start()
    deadline = time.monotonic() + 120
    while not (jobs_of(client, "jobs-b", "features") and str(client.get_job_status(sid)) == "RUNNING"):
        assert time.monotonic() < deadline, "the job did not start running"
        time.sleep(0.5)
    second = threading.Thread(target=call, args=("second",), daemon=True)
    second.start()
    time.sleep(3)  # the second caller attaches while the job waits at its gate
    assert str(client.get_job_status(sid)) == "RUNNING" and len(jobs_of(client, "jobs-b", "features")) == 1
    gate.touch()
    first.join(180)
    second.join(180)
    assert not isinstance(results["first"], Exception), results["first"]
    assert not isinstance(results["second"], Exception), results["second"]
    assert results["first"]["job_id"] == results["second"]["job_id"] == sid
    assert results["first"]["utterances"] == results["second"]["utterances"] == 40
    for name in logs:  # both callers streamed the one job's log
        assert "gate open" in logs[name] and any('"utterances": 40' in line for line in logs[name]), logs[name][-5:]
    jobs = jobs_of(client, "jobs-b", "features")
    assert [(j.submission_id, str(j.status)) for j in jobs] == [(sid, "SUCCEEDED")]
    assert read_job_record(ctx, "features")["attempt"] == 1
