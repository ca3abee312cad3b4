"""Reliability scenario 10: the Airflow task that submitted a stage's Ray Job and follows it is killed
(SIGKILL) while the job runs; its retry re-attaches to the same job, which finishes, and only one job
ran for the stage in all.

The submitter is a process of its own running :func:`pipeline.jobs.submit_stage`, as an Airflow task
does. The job's entrypoint waits at a gate file before it runs the real ``asr-retune features`` command,
so the kill lands while the job is RUNNING, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support.job_cluster import demo_run, gated_entrypoint, job_config, jobs_of, running_cluster, write_config

from pipeline.jobs import job_client, read_job_record, submission_id

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RUN = "job-reattach"
SUBMITTER = textwrap.dedent("""
    import json, logging, sys
    from pipeline.config import load_config
    from pipeline.jobs import submit_stage
    from pipeline.run import RunContext

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
    ctx = RunContext.create(load_config(), run_id=sys.argv[1], root=sys.argv[2])
    summary = submit_stage(ctx, "features", echo=lambda line: print("JOB|", line, flush=True), poll_s=0.5)
    print("RESULT " + json.dumps(summary, default=str), flush=True)
""")


def _submitter(config_path: Path, root: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "ASR_RETUNE_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"}
    with open(out, "w") as f:
        return subprocess.Popen([sys.executable, "-c", SUBMITTER, RUN, str(root)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for(check, what: str, timeout_s: float = 120.0) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"not seen within {timeout_s:.0f} s: {what}")
        time.sleep(0.3)
    return time.monotonic() - t0


@pytest.mark.scenario(10, expected="the submitting task is SIGKILLed while its job runs; the job keeps running, "
                      "the retry re-attaches to it (same submission id), the job finishes, one job ran in all; "
                      "no work lost")
def test_killed_submitter_is_retried_and_reattaches_to_the_one_job(tmp_path, observe):
    gate = tmp_path / "gate"
    config = job_config(tmp_path, job_entrypoint=gated_entrypoint(gate))
    path = write_config(config, tmp_path / "config.yaml")
    root = tmp_path / "store"
    ctx = demo_run(config, root, RUN)
    sid = submission_id(RUN, "features")
    with running_cluster(config):
        client = job_client(config)
        first = _submitter(path, root, tmp_path / "first.log")
        try:
            _wait_for(lambda: jobs_of(client, RUN, "features") and str(client.get_job_status(sid)) == "RUNNING",
                      "the first submitter's job running")
            _wait_for(lambda: "JOB|" in (tmp_path / "first.log").read_text(), "the first submitter tailing the log")
            started = client.get_job_info(sid).start_time
            os.killpg(first.pid, signal.SIGKILL)  # the Airflow task dies: its process and children
            assert first.wait(30) == -signal.SIGKILL
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
        time.sleep(2)
        assert str(client.get_job_status(sid)) == "RUNNING", "the job must survive its submitter"
        assert read_job_record(ctx, "features")["submission_id"] == sid

        t0 = time.monotonic()
        retry = _submitter(path, root, tmp_path / "retry.log")
        try:
            _wait_for(lambda: f"re-attaching to Ray job {sid}" in (tmp_path / "retry.log").read_text(),
                      "the retry re-attaching")
            attach_s = time.monotonic() - t0
            gate.touch()  # the job now runs the real stage
            assert retry.wait(180) == 0, (tmp_path / "retry.log").read_text()[-3000:]
        finally:
            if retry.poll() is None:
                os.killpg(retry.pid, signal.SIGKILL)
        total_s = time.monotonic() - t0
        out = (tmp_path / "retry.log").read_text()
        summary = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        assert summary["job_id"] == sid and summary["job_attempt"] == 1 and summary["utterances"] == 40
        assert "JOB| gate open" in out and "submitted stage" not in out  # followed, never resubmitted
        jobs = jobs_of(client, RUN, "features")
        assert [(j.submission_id, str(j.status)) for j in jobs] == [(sid, "SUCCEEDED")]
        assert jobs[0].start_time == started  # the same job throughout, never restarted
        assert ctx.summary("features")["job_id"] == sid
    observe(f"submitter SIGKILLed while job {sid} was RUNNING; 2 s later the job still RUNNING; the retry "
            f"re-attached in {attach_s:.1f} s and returned the stage's summary {total_s:.1f} s after it started; "
            f"list_jobs: 1 job for the stage (SUCCEEDED, start time unchanged); work lost: none (the job never stopped)")
