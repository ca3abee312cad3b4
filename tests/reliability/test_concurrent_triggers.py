"""Reliability scenario 7 (second half): two manual triggers of the real DAG at the same moment.

``airflow dags test`` runs one DAG run in-process and ignores ``max_active_runs``, so this
test runs a real Airflow 3 in a throw-away ``AIRFLOW_HOME`` (SQLite, LocalExecutor): the
``api-server`` (the task execution API the task processes talk to), the ``scheduler`` and
the ``dag-processor``, each its own process group. The DAG gets a cron that never fires
(29 February) so the scheduler creates no run of its own; two ``airflow dags trigger``
commands are started together on the tiny corpus of ``tests/dags`` (one epoch, one search
trial). While they run, the metadata DB is sampled every ~0.5 s; at the end the runs' and
task instances' start/end times are read from it.

Asserted: both runs succeed; while the first was running the second was seen ``queued``
(never two runs ``running`` at once); every task instance of the second run started after
the last task instance of the first ended (no interleaving), and the second run started
after the first ended.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "dags"))  # the DAG tests' helpers
from support.dag_env import DAG_ID, PROJECT_ROOT, TINY, airflow_env  # noqa: E402

from pipeline.serving.ports import free_port

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
# short runs: one epoch, one search trial (the gate fails on 40 utterances: no register/deploy)
CONF = {"proxy_fraction": 0.6, "epochs": 1, "search_trials": 1, "skip_deploy": True}
NEVER = "0 3 29 2 *"  # no scheduled run interferes (next one in 2028)
TERMINAL = {"success", "failed"}

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]



def _airflow(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([AIRFLOW, *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _parse_ts(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


class Airflow:
    """api-server + scheduler + dag-processor of one throw-away Airflow home."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        self.tmp, self.env = tmp, env
        self.db_path = Path(env["AIRFLOW_HOME"]) / "airflow.db"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen([AIRFLOW, *args], env=self.env, cwd=PROJECT_ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.tmp / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"airflow {name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for proc in self.procs.values():  # our own process groups, by id
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 30
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def query(self, sql: str, *args) -> list[tuple]:
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def wait_for(self, what: str, predicate, timeout: float, every: float = 1.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.check_alive()
            try:
                value = predicate()
            except sqlite3.OperationalError:  # locked, or a table not migrated yet
                value = None
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.storage import open_store

    tmp = tmp_path_factory.mktemp("concurrent-triggers")
    port = free_port()
    env = airflow_env(
        tmp, **TINY,
        ASR_RETUNE__ORCHESTRATION__SCHEDULE=NEVER,
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__API__SECRET_KEY=secrets.token_hex(32),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY="1",
    )
    config = load_config(environ=env)
    build_demo_corpus(open_store(None, config.storage), config.demo, config.audio.sample_rate, progress=False)
    out = _airflow(["db", "migrate"], env, 300)
    assert out.returncode == 0, out.stderr[-3000:]
    out = _airflow(["pools", "set", "asr_compute", "1", "Ray-bound stages of asr_weekly_retune"], env, 120)
    assert out.returncode == 0, out.stderr[-3000:]

    af = Airflow(tmp, env)
    try:
        af.start("api-server", "api-server", "--port", str(port))
        af.start("dag-processor", "dag-processor")
        af.start("scheduler", "scheduler")

        def api_up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        af.wait_for("the api-server", api_up, 180, every=2)
        af.wait_for(f"{DAG_ID} to be parsed", lambda: af.query(
            "select 1 from dag where dag_id=? and is_paused=0", DAG_ID), 240, every=2)
        yield af
    finally:
        af.stop()


@pytest.mark.scenario(7, expected="two manual triggers at once (real scheduler, max_active_runs=1): the second run "
                                   "stays queued while the first runs; both succeed; no task of the second starts "
                                   "before the first's last task ended")
def test_two_manual_triggers_at_once_never_interleave(airflow, observe):
    af = airflow
    assert af.query("select max_active_runs from dag where dag_id=?", DAG_ID) == [(1,)]
    t0 = time.perf_counter()
    triggers = [subprocess.Popen([AIRFLOW, "dags", "trigger", DAG_ID, "-c", json.dumps(CONF)], env=af.env,
                                 cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    for proc in triggers:
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, (stdout[-2000:], stderr[-2000:])
    trigger_s = time.perf_counter() - t0

    runs_sql = "select run_id, state from dag_run where dag_id=? and run_type='manual'"
    af.wait_for("both runs to exist", lambda: len(af.query(runs_sql, DAG_ID)) == 2, 60, every=0.5)

    # sample the run states until both are terminal
    samples: list[dict[str, str]] = []
    deadline = time.time() + 1200
    while time.time() < deadline:
        af.check_alive()
        try:
            states = dict(af.query(runs_sql, DAG_ID))
        except sqlite3.OperationalError:
            time.sleep(0.2)
            continue
        samples.append(states)
        if all(s in TERMINAL for s in states.values()):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the runs did not finish in time: {samples[-1]}")

    runs = {run_id: dict(zip(("state", "queued_at", "start_date", "end_date"), row)) for run_id, *row in af.query(
        "select run_id, state, queued_at, start_date, end_date from dag_run where dag_id=? and run_type='manual'",
        DAG_ID)}
    for run in runs.values():
        for key in ("queued_at", "start_date", "end_date"):
            run[key] = _parse_ts(run[key])
    tis = {run_id: af.query(
        "select task_id, state, start_date, end_date from task_instance where dag_id=? and run_id=?",
        DAG_ID, run_id) for run_id in runs}
    assert [r["state"] for r in runs.values()] == ["success", "success"], (
        f"logs in {af.tmp}", {r: [(t, s) for t, s, *_ in tis[r]] for r in tis})
    first, second = sorted(runs, key=lambda r: runs[r]["start_date"])
    # the second run waited: seen queued while the first was running, never both running
    both_running = [s for s in samples if list(s.values()).count("running") > 1]
    waited = [s for s in samples if s.get(first) == "running" and s.get(second) == "queued"]
    assert both_running == [] and waited, samples[:5]
    queued_apart = abs((runs[second]["queued_at"] - runs[first]["queued_at"]).total_seconds())
    assert queued_apart < 60

    ran = {r: [(t, _parse_ts(s0), _parse_ts(s1)) for t, state, s0, s1 in tis[r] if s0 is not None] for r in runs}
    first_last_end = max(end for _, _, end in ran[first])
    second_first_start = min(start for _, start, _ in ran[second])
    assert second_first_start >= first_last_end, (ran[first], ran[second])
    assert runs[second]["start_date"] >= runs[first]["end_date"]
    assert len(ran[first]) >= 7 and len(ran[second]) >= 7  # ingest .. gate, decide, report_no_change

    def hms(t: dt.datetime) -> str:
        return t.strftime("%H:%M:%S")

    observe(
        f"2 concurrent triggers took {trigger_s:.1f} s, runs queued {queued_apart:.1f} s apart; "
        f"run 1 {hms(runs[first]['start_date'])}-{hms(runs[first]['end_date'])} "
        f"({(runs[first]['end_date'] - runs[first]['start_date']).total_seconds():.0f} s, {len(ran[first])} tasks); "
        f"run 2 queued {hms(runs[second]['queued_at'])}, started {hms(runs[second]['start_date'])}, "
        f"ended {hms(runs[second]['end_date'])}; "
        f"run 2's first task started {(second_first_start - first_last_end).total_seconds():.1f} s after "
        f"run 1's last task ended; {len(waited)} of {len(samples)} samples saw run 2 queued while run 1 ran, "
        f"0 saw both running"
    )
