"""Helpers of the DAG and plugin tests (imported by ``conftest.py`` first).

Airflow reads ``AIRFLOW_HOME`` and its ``AIRFLOW__...`` settings when it is first imported,
so they are pinned here, before any test module imports Airflow: a throw-away home, the
project's ``dags/`` and ``plugins/``, no example DAGs. Subprocesses (``airflow ...``) get
their own environment from :func:`airflow_env`; a running Airflow (``api-server`` and the
other components, simple-auth users) comes from :func:`api_server_env` and
:class:`AirflowProcesses`.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = PROJECT_ROOT / "dags"
PLUGINS_DIR = PROJECT_ROOT / "plugins"
DAG_ID = "asr_weekly_retune"

_HOME = tempfile.mkdtemp(prefix="asr-airflow-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = _HOME
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_DIR)
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(PLUGINS_DIR)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME}/airflow.db"

# The tiny corpus and budget of the end-to-end run (environment overrides of the config).
TINY = {
    "ASR_RETUNE__DEMO__WEEKS": "1",
    "ASR_RETUNE__DEMO__UTTERANCES_PER_WEEK": "40",
    "ASR_RETUNE__DEMO__GOLDEN_UTTERANCES": "20",
    "ASR_RETUNE__TRAIN__EPOCHS": "1",
    "ASR_RETUNE__TRAIN__BATCH_SIZE": "8",
    "ASR_RETUNE__SEARCH__TRIALS": "2",
    "ASR_RETUNE__SEARCH__MAX_EPOCHS": "1",
    "ASR_RETUNE__SEARCH__GRACE_PERIOD": "1",
    "ASR_RETUNE__SEARCH__MAX_CONCURRENT": "2",
    "ASR_RETUNE__SEARCH__BUDGET_S": "300",
    "ASR_RETUNE__GATE__BOOTSTRAP_RESAMPLES": "200",
}


def airflow_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of an ``airflow`` subprocess: its own home and SQLite DB in ``tmp``, the
    project's DAGs and plugin, a store in ``tmp/store``; no alert hook can reach the network."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "ASR_RETUNE")) and k not in ("RAY_ADDRESS",)}
    home = tmp / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_DIR),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "ASR_RETUNE__STORAGE__ROOT": str(tmp / "store"),
        "ASR_RETUNE__MLFLOW__TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        "ASR_RETUNE__MLFLOW__ARTIFACT_ROOT": str(tmp / "mlartifacts"),
        "ASR_RETUNE_ALERT_FILE": str(tmp / "alerts.jsonl"),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


# --------------------------------------------------------------------------- report fixtures


def _decision(run_id: str, *, passed: bool, forced: bool = False, reason: str | None = None,
              cold: bool = False, failing: list[str] | None = None, cand: float = 0.041,
              prod: float | None = 0.052, ci: tuple[float, float] | None = (-0.019, -0.003)) -> dict:
    """A decision in the layout ``pipeline/stages/gate/stage.py`` writes (the fields the browser reads)."""
    return {
        "run_id": run_id,
        "decided_at": "2026-12-01T10:30:00+00:00",
        "passed": passed,
        "rules_passed": passed and not forced,
        "failing_rules": failing or [],
        "cold_start": cold,
        "forced": forced,
        "force_reason": reason,
        "forced_by": "oncall@example.com" if forced else None,
        "bootstrap": None if cold or ci is None else {"delta": sum(ci) / 2, "ci_low": ci[0], "ci_high": ci[1],
                                                      "confidence": 0.95, "n_resamples": 2000, "seed": 0},
        "candidate": {"wer": cand, "cer": cand / 2, "rtf": 0.01, "n_utts": 300, "n_words": 1200},
        "production": None if cold else {"model": "asr", "version": "3", "wer": prod, "cer": 0.02,
                                         "rtf": 0.01, "n_utts": 300, "n_words": 1200},
        "config": {"max_wer": 0.4, "mode": "improve"},
    }


REPORT_RUNS = {
    # run id -> (stages completed, stages started but not completed, decision or None)
    "scheduled__2026-11-23T03:00:00+00:00": (
        ["ingest", "features", "proxy", "train", "gate"], [], dict(passed=True)),
    "scheduled__2026-11-30T03:00:00+00:00": (
        ["ingest", "features", "proxy", "train", "gate"], [],
        dict(passed=False, failing=["delta_wer", "worst_group"], cand=0.061, ci=(-0.004, 0.012))),
    "manual__2026-12-01T10:00:00+00:00": (
        ["ingest", "features", "proxy", "train", "gate"], [],
        dict(passed=True, forced=True, reason="<script>alert(1)</script> hotfix for INC-42", failing=["delta_wer"])),
    "manual__2026-12-02T09:30:00+00:00": (["ingest", "features"], ["train"], None),
    "cli__20261120T101500Z__ab12cd": (
        ["ingest", "features", "proxy", "train", "gate"], [], dict(passed=True, cold=True, prod=None, ci=None)),
}
NEWEST_FIRST = [
    "manual__2026-12-02T09:30:00+00:00",
    "manual__2026-12-01T10:00:00+00:00",
    "scheduled__2026-11-30T03:00:00+00:00",
    "scheduled__2026-11-23T03:00:00+00:00",
    "cli__20261120T101500Z__ab12cd",
]


def report_html(run_id: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gate report</title></head>"
            f"<body><h1>Gating report</h1><p>run {run_id}</p></body></html>")


def populate_reports(store) -> None:
    """Runs in the layout the stages write: ``_SUCCESS`` markers, a gate decision and report."""
    for run_id, (done, started, decision) in REPORT_RUNS.items():
        for stage in done:
            store.put_text(f"runs/{run_id}/{stage}/_SUCCESS", json.dumps({"stage": stage, "run_id": run_id}))
        for stage in started:
            store.put_text(f"runs/{run_id}/{stage}/partial.bin", "x")
        store.put_text(f"runs/{run_id}/_work/train/checkpoint_000000/state.pt", "ray work area")
        if decision is not None:
            store.put_text(f"runs/{run_id}/gate/decision.json", json.dumps(_decision(run_id, **decision)))
            store.put_text(f"runs/{run_id}/gate/report.html", report_html(run_id))
    store.put_text("runs/not a run id/ingest/_SUCCESS", "{}")  # ignored: not a valid run id


# --------------------------------------------------------------------------- a running Airflow

API_USERS = {"ops": ("op", "ops-password-7f3a"), "watcher": ("viewer", "watcher-password-91c2")}


def api_server_env(tmp: Path, port: int, users: dict[str, tuple[str, str]] = API_USERS, **extra: str) -> dict[str, str]:
    """:func:`airflow_env` plus an ``api-server`` on ``127.0.0.1:port`` (LocalExecutor, one
    worker, fresh JWT and session secrets) whose simple auth manager knows ``users``
    (username -> (role, password)), written to a passwords file in ``tmp``."""
    passwords = tmp / "simple_auth_passwords.json"
    passwords.write_text(json.dumps({name: password for name, (_, password) in users.items()}))
    return airflow_env(
        tmp,
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=",".join(f"{name}:{role}" for name, (role, _) in users.items()),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__API__SECRET_KEY=secrets.token_hex(32),
        **extra,
    )


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # a group this module started (start_new_session)
    except ProcessLookupError:
        pass


class AirflowProcesses:
    """Long-running ``airflow`` components (``api-server``, ``scheduler``, ``dag-processor``) of
    one throw-away home, each in its own process group, its output in ``tmp/<name>.log``."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        self.tmp, self.env = tmp, env
        self.airflow = str(Path(sys.executable).with_name("airflow"))  # the airflow of this environment
        self.procs: dict = {}

    def run(self, *args: str, timeout: float = 300):
        """One ``airflow`` command to completion; raises with its output's tail if it fails."""
        out = subprocess.run([self.airflow, *args], env=self.env, cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"airflow {' '.join(args)} exited with {out.returncode}:\n{out.stderr[-3000:]}")
        return out

    def start(self, name: str, *args: str) -> None:
        with open(self.tmp / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen([self.airflow, *args], env=self.env, cwd=PROJECT_ROOT, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"airflow {name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def stop(self, *names: str) -> None:
        """SIGTERM the named components (all by default) by their own process groups; SIGKILL after 30 s."""
        procs = [self.procs.pop(n) for n in (names or list(self.procs))]
        for proc in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.time() + 30
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)  # the component, or what it left behind in its group
            proc.wait(timeout=10)

    def wait_for(self, what: str, predicate, timeout: float, every: float = 1.0):
        """``predicate()``'s first truthy value, polled every ``every`` s while the components live."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.check_alive()
            value = predicate()
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
