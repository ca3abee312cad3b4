"""One complete ``airflow dags test asr_weekly_retune`` on a tiny corpus and budget.

The run is troubled on purpose (``ASR_RETUNE_TEST_FAIL_ONCE``): ``ingest`` and ``features``
fail their first try *after* their stage wrote its outputs (completion marker removed, a
stray file left in the partition), ``proxy`` fails *before* its stage runs. Airflow retries
them; the run must succeed, and the outputs of those stages must equal an untroubled run
of the same stages (same run id, a pristine copy of the same store).

Set-up: AIRFLOW_HOME and SQLite in tmp, ``airflow db migrate``, the ``asr_compute`` pool,
the tiny demo corpus; ~1 minute in all on 2 cores (most of it Airflow start-up and Ray).
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.dag_env import DAG_ID, PROJECT_ROOT, TINY, airflow_env

from pipeline.demo.dagtest import run_week_dag

AIRFLOW = str(Path(sys.executable).with_name("airflow"))  # the airflow of this test environment
FAULTS = "ingest:after,features:after,proxy:before"
FAULTED = {"ingest", "features", "proxy"}
ALL_TASKS = ["ingest", "features", "proxy", "search", "train", "gate", "decide", "register", "deploy", "report_no_change"]
# one epoch on 40 utterances cannot pass the gate's WER ceiling: the branch reports no change
EXPECTED_STATE = {t: "success" for t in ALL_TASKS} | {"register": "skipped", "deploy": "skipped"}
CONF = {"proxy_fraction": 0.6, "epochs": 1}  # 40 utterances: the default 0.3 leaves no dev set
# What a stage's summary says about the work it did (not about its outputs): differs on a retry.
WORK_ACCOUNTING = {"compute_seconds", "elapsed_seconds", "computed", "reused", "computed_utts_per_s",
                   "new_shards", "shards_before"}

pytestmark = pytest.mark.timeout(900)


def _airflow(args: list[str], env: dict[str, str], timeout: float, log: Path | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([AIRFLOW, *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    return out


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.storage import open_store

    tmp = tmp_path_factory.mktemp("dag-e2e")
    env = airflow_env(tmp, **TINY)  # train: the configured 2 DDP workers (Ray Train, gloo)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    config = load_config(environ=env)
    build_demo_corpus(open_store(None, config.storage), config.demo, config.audio.sample_rate, progress=False)
    shutil.copytree(tmp / "store", tmp / "pristine")
    timings["corpus_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = _airflow(["db", "migrate"], env, 300, tmp / "migrate.log")
    assert out.returncode == 0, out.stderr[-3000:]
    out = _airflow(["pools", "set", "asr_compute", "1", "Ray-bound stages of asr_weekly_retune"], env, 120)
    assert out.returncode == 0, out.stderr[-3000:]
    timings["airflow_setup_s"] = time.perf_counter() - t0

    # the demo's driver runs `airflow dags test` and watches it (pipeline.demo.dagtest)
    t0 = time.perf_counter()
    printed = io.StringIO()
    ctx = run_week_dag(config, open_store(None, config.storage),
                       {**env, "ASR_RETUNE_TEST_FAIL_ONCE": FAULTS, "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1"},
                       tmp / "dags-test.log", conf=CONF, out=printed, bars=False)
    timings["dags_test_s"] = time.perf_counter() - t0
    print(f"e2e timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})} (log: {tmp / 'dags-test.log'})")
    runs = sorted(p.name for p in (tmp / "store" / "runs").iterdir())
    assert runs == [ctx.run_id], runs
    return {"tmp": tmp, "env": env, "run_id": runs[0], "config": config, "timings": timings,
            "printed": printed.getvalue(), "ctx": ctx}


def _db(e2e) -> sqlite3.Connection:
    return sqlite3.connect(e2e["tmp"] / "airflow" / "airflow.db")


def test_run_and_every_task_succeeded(e2e):
    with _db(e2e) as db:
        (state, run_id, conf), = db.execute("select state, run_id, conf from dag_run where dag_id=?", (DAG_ID,))
        tis = {t: (s, n) for t, s, n in db.execute(
            "select task_id, state, try_number from task_instance where dag_id=?", (DAG_ID,))}
        failed_tries = {t: n for t, n in db.execute(
            "select task_id, try_number from task_instance_history where dag_id=? and state='failed'", (DAG_ID,))}
    assert state == "success"
    assert json.loads(conf) == CONF
    assert run_id == e2e["run_id"]  # the store partition is named after the Airflow run
    assert {t: s for t, (s, _) in tis.items()} == EXPECTED_STATE
    # the faulted tasks succeeded on their second try, the others on their first (a skipped task never ran)
    ran = [t for t in ALL_TASKS if EXPECTED_STATE[t] != "skipped"]
    assert {t: n for t, (_, n) in tis.items() if t in ran} == {t: (2 if t in FAULTED else 1) for t in ran}
    assert failed_tries == {t: 1 for t in FAULTED}


def test_outputs_exist(e2e):
    run = e2e["tmp"] / "store" / "runs" / e2e["run_id"]
    for stage in ("ingest", "features", "proxy", "search", "train", "gate"):
        assert (run / stage / "_SUCCESS").is_file(), stage
    assert (run / "ingest" / "quarantine.jsonl").is_file()  # empty: the tiny corpus has no defects
    for name in ("features/index.json", "proxy/train.jsonl", "proxy/dev.jsonl",
                 "search/best_config.json", "search/leaderboard.json",
                 "train/model.pt", "train/metrics.json", "train/history.json",
                 "gate/decision.json", "gate/report.html"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert not list(run.rglob("_debris_of_failed_attempt")), "a retry left a failed attempt's debris"
    train = json.loads((run / "train" / "_SUCCESS").read_text())
    assert train["epochs"] == 1 and train["n_train"] > 0
    with _db(e2e) as db:
        (value,), = db.execute(
            "select value from xcom where dag_id=? and task_id='gate' and key='return_value'", (DAG_ID,))
    gate = json.loads(value)
    decision = json.loads((run / "gate" / "decision.json").read_text())
    assert gate["passed"] is False is decision["passed"] and decision["cold_start"] is True
    assert "wer_ceiling" in " ".join(r["name"] for r in decision["rules"] if not r["passed"])


def test_training_pool_asset_updated(e2e):
    with _db(e2e) as db:
        rows = db.execute(
            "select a.name, e.extra from asset_event e join asset a on a.id = e.asset_id "
            "where e.source_task_id='ingest'").fetchall()
    assert len(rows) == 1
    name, extra = rows[0]
    extra = json.loads(extra)
    assert name == "asr-retune://training-pool"
    assert extra["run_id"] == e2e["run_id"] and extra["pool_size"] == 40 and extra["pool_version"]


def test_retries_raised_warning_alerts_and_no_failure_alert(e2e):
    lines = [json.loads(line) for line in (e2e["tmp"] / "alerts.jsonl").read_text().splitlines()]
    assert sorted((a["kind"], a["task_id"]) for a in lines) == sorted(("retry", t) for t in FAULTED)
    for alert in lines:
        assert alert["run_id"] == e2e["run_id"] and "InjectedFault" in alert["error"]
        assert alert["line"].startswith("ASR-RETUNE ALERT [RETRY] dag=asr_weekly_retune")
    log = (e2e["tmp"] / "dags-test.log").read_text()
    assert "ASR-RETUNE ALERT [RETRY]" in log and "ASR-RETUNE ALERT [FAILED]" not in log


def _normalized_files(root: Path) -> dict[str, bytes]:
    """Every output file of ingest, features and proxy (run partitions and state), with the
    store's own root URI replaced, so two stores can be compared."""
    out = {}
    uri = root.resolve().as_uri().encode()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if (not path.is_file() or rel.startswith(("incoming/", "golden/")) or "/_work/" in rel
                or any(part in rel for part in ("/train/", "/search/", "/gate/", "/register/", "/decide/"))
                or rel.startswith(("state/search/", "state/registry/")) or "/features-" in rel):
            continue
        data = path.read_bytes().replace(uri, b"ROOT")
        if rel == "state/ingest/ledger.json":
            ledger = json.loads(data)
            for drop in ledger.get("drops", {}).values():
                drop.pop("ingested_at", None)  # when, not what
            data = json.dumps(ledger, sort_keys=True).encode()
        elif rel.endswith("/features/_SUCCESS"):
            data = json.dumps({k: v for k, v in json.loads(data).items() if k not in WORK_ACCOUNTING},
                              sort_keys=True).encode()
        out[rel] = data
    return out


def test_retried_stages_produce_the_same_outputs_as_an_untroubled_run(e2e):
    from pipeline.run import RunContext
    from pipeline.stages.features import extract_features
    from pipeline.stages.ingest.stage import ingest
    from pipeline.stages.proxy import sample_proxy
    from pipeline.storage import open_store

    reference = e2e["tmp"] / "pristine"
    ctx = RunContext(run_id=e2e["run_id"], config=e2e["config"], store=open_store(str(reference)))
    ingest(ctx, progress=False)
    extract_features(ctx, progress=False)
    sample_proxy(ctx, fraction=CONF["proxy_fraction"])

    troubled = _normalized_files(e2e["tmp"] / "store")
    untroubled = _normalized_files(reference)
    # the search also cached the other front ends of its space; the reference ran no search
    caches = {k.split("/")[2] for k in untroubled if k.startswith("state/features/")}
    troubled = {k: v for k, v in troubled.items() if not k.startswith("state/features/") or k.split("/")[2] in caches}
    assert sorted(troubled) == sorted(untroubled)
    assert any(k.endswith("proxy/train.jsonl") for k in troubled)
    different = [k for k in troubled if troubled[k] != untroubled[k]]
    assert different == []


def test_demo_driver_prints_a_line_per_stage_and_the_row_comes_from_summaries(e2e):
    from pipeline.demo.summary import week_row

    lines = e2e["printed"].splitlines()
    assert [line.split()[0] for line in lines] == ["ingest", "features", "proxy", "search", "train", "gate"]
    assert "+40 accepted, 0 quarantined" in lines[0] and "FAILED" in lines[-1]  # nothing else: the log has the rest
    log = (e2e["tmp"] / "dags-test.log").read_text()
    assert "InjectedFault" in log and "[DAG TEST]" in log
    progress = json.loads((e2e["tmp"] / "dags-test.progress.json").read_text())
    assert progress["done"] and progress["n"] == progress["total"]  # the stages kept the watcher's file up to date
    ctx = e2e["ctx"]
    gate = ctx.summary("gate")
    row = week_row(1, "week-001", {s: ctx.summary(s) for s in ("ingest", "search", "gate")})
    assert row.pool == "40 (+40)" and row.decision.startswith("FAILED") and row.serving == "none"
    assert row.candidate == f"{100 * gate['candidate_wer']:.1f}%"


def test_cli_refuses_bad_params_before_running_anything(e2e):
    runs_before = sorted((e2e["tmp"] / "store" / "runs").iterdir())
    out = _airflow(["dags", "test", DAG_ID, "-c", json.dumps({"epochs": "ten"})], e2e["env"], 300)
    assert out.returncode != 0
    assert "Invalid input for param epochs" in out.stdout + out.stderr
    assert sorted((e2e["tmp"] / "store" / "runs").iterdir()) == runs_before


def test_cli_run_with_an_unknown_conf_key_fails_at_once_naming_it(e2e):
    """``dags test -c`` writes the run to the DB directly (the API server's check is not on the way):
    the first task refuses the key, before any stage has run and without retries."""
    runs_before = sorted((e2e["tmp"] / "store" / "runs").iterdir())
    out = _airflow(["dags", "test", DAG_ID, "-c", json.dumps({"epoch": 2, "proxy_fraction": 0.6})], e2e["env"], 300)
    printed = out.stdout + out.stderr
    assert "unknown parameter 'epoch' (did you mean 'epochs'?) in conf of asr_weekly_retune" in printed, printed[-3000:]
    assert sorted((e2e["tmp"] / "store" / "runs").iterdir()) == runs_before  # no partition, no stage output
    with _db(e2e) as db:  # the module's last test: the others read the one troubled run as the only run
        runs = db.execute("SELECT run_id, conf FROM dag_run WHERE dag_id = ? ORDER BY id", (DAG_ID,)).fetchall()
        assert len(runs) == 2 and "epoch" in str(runs[-1][1]), runs  # the troubled run, then this one
        run_id = runs[-1][0]
        states = dict(db.execute("SELECT task_id, state FROM task_instance WHERE run_id = ?", (run_id,)).fetchall())
        tries = db.execute("SELECT try_number FROM task_instance WHERE run_id = ? AND task_id = 'ingest'",
                           (run_id,)).fetchone()
    assert states.get("ingest") == "failed" and tries == (1,), (states, tries)
    assert all(states.get(t) in (None, "upstream_failed", "skipped") for t in ALL_TASKS if t != "ingest"), states
