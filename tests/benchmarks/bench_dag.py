"""Benchmark: whole-DAG wall time against the sum of its tasks' own run time, same run.

    .venv/bin/python tests/benchmarks/bench_dag.py

Runs ``airflow dags test asr_weekly_retune`` once on a tiny corpus (1 week of 40
utterances, 2 search trials of 1 epoch, 1 training epoch) in a throw-away AIRFLOW_HOME
with SQLite, then reads the metadata DB: the DAG run's wall time (start to end) and the
sum of its task instances' durations (what each task spent running, retries excluded).
Prints one JSON object; ``ratio = dag_wall_s / sum_task_s``, goal <= 1.3. On the tiny
corpus the stages are short, so Airflow's per-task start-up weighs more than it would on a
real week.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_ROOT / "tests" / "dags"))

from support.dag_env import TINY, airflow_env  # noqa: E402


def main() -> None:
    airflow = str(Path(sys.executable).with_name("airflow"))
    asr = str(Path(sys.executable).with_name("asr-retune"))
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        env = airflow_env(tmpd, **TINY)
        env["ASR_RETUNE__SERVING__WORK_DIR"] = str(tmpd / "serving")
        run = lambda *a: subprocess.run(a, env=env, cwd=PROJECT_ROOT, check=True, capture_output=True, text=True)  # noqa: E731
        run(asr, "demo-data", "--quiet", "--json")
        run(airflow, "db", "migrate")
        run(airflow, "pools", "set", "asr_compute", "1", "bench")
        run(airflow, "dags", "test", "asr_weekly_retune", "-c", json.dumps({"proxy_fraction": 0.6}))
        db = sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")
        (wall,) = db.execute(
            "select (julianday(end_date) - julianday(start_date)) * 86400 from dag_run where dag_id='asr_weekly_retune'"
        ).fetchone()
        tasks = db.execute(
            "select task_id, duration, state from task_instance where dag_id='asr_weekly_retune'"
        ).fetchall()
    total = sum(d or 0.0 for _, d, _ in tasks)
    print(json.dumps({
        "benchmark": "dag_overhead",
        "dag_wall_s": round(wall, 2),
        "sum_task_s": round(total, 2),
        "ratio": round(wall / total, 3) if total else None,
        "goal": 1.3,
        "tasks": {t: {"s": round(d or 0.0, 2), "state": s} for t, d, s in tasks},
    }), flush=True)


if __name__ == "__main__":
    main()
