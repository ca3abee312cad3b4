"""The DAG parses cleanly, cheaply and without touching a database, a connection or the network;
its tasks retry, time out, use the compute pool and alert; its parameters validate."""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
import sys
import textwrap

import pytest
from support.dag_env import DAG_ID, DAGS_DIR, PROJECT_ROOT

EXISTING_STAGES = ["ingest", "features", "proxy", "search", "train", "gate"]
BRANCHES = ["decide", "register", "deploy", "report_no_change"]
ALL_TASKS = EXISTING_STAGES + BRANCHES
COMPUTE_HEAVY = {"features", "search", "train", "gate"}
PARSE_BUDGET_S = 2.0

# Runs in a fresh interpreter: sockets and DB connections raise (and are recorded) while the
# DagBag is filled; the metadata DB points at a folder that does not exist.
_PARSE_PROBE = textwrap.dedent(
    """
    import json, socket, sys, time
    attempts = []

    def blocked(name):
        def refuse(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"blocked during DAG parsing: {name}")
        return refuse

    from airflow.dag_processing.dagbag import DagBag
    import sqlalchemy.event
    from sqlalchemy.engine import Engine

    sqlalchemy.event.listen(Engine, "do_connect", lambda *a: attempts.append("database connect"))
    for name in ("connect", "connect_ex", "sendto"):
        setattr(socket.socket, name, blocked(f"socket.{name}"))
    for name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyaddr"):
        setattr(socket, name, blocked(f"socket.{name}"))

    before = set(sys.modules)
    t0 = time.perf_counter()
    bag = DagBag(dag_folder=sys.argv[1])
    wall = time.perf_counter() - t0
    stats = {s.file: s.duration.total_seconds() for s in bag.dagbag_stats}
    print(json.dumps({
        "import_errors": {k: str(v) for k, v in bag.import_errors.items()},
        "dag_ids": sorted(bag.dag_ids),
        "attempts": attempts,
        "file_parse_s": stats,
        "wall_s": wall,
        "new_modules": sorted(m for m in set(sys.modules) - before if m.split(".")[0] in
                              ("ray", "torch", "torchaudio", "mlflow", "boto3", "botocore", "pipeline")),
    }))
    """
)


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


def test_dagbag_parses_without_db_connection_or_network(tmp_path):
    never = tmp_path / "store-never-created"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/missing/dir/airflow.db",
        "ASR_RETUNE__STORAGE__ROOT": str(never),
        "ASR_RETUNE__RAY__ADDRESS": "ray://198.51.100.1:10001",  # unreachable: must not be contacted
        "ASR_RETUNE__MLFLOW__TRACKING_URI": "http://198.51.100.1:5000",
    }
    out = subprocess.run(
        [sys.executable, "-c", _PARSE_PROBE, str(DAGS_DIR)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["import_errors"] == {}
    assert result["dag_ids"] == [DAG_ID]
    assert result["attempts"] == [], f"network or DB access at parse time: {result['attempts']}"
    # only the light modules: no store, Ray, torch, MLflow or boto3 at parse time
    light = {"pipeline", "pipeline.airflow", "pipeline.airflow.alerts", "pipeline.config", "pipeline.config.base",
             "pipeline.config.sections", "pipeline.config.serving", "pipeline.config.loader"}
    assert set(result["new_modules"]) <= light, result["new_modules"]
    assert not never.exists(), "parsing the DAG touched the store"
    (parse_s,) = result["file_parse_s"].values()
    print(f"DAG file parse: {parse_s * 1000:.0f} ms (DagBag fill {result['wall_s']:.2f} s)")
    assert parse_s < PARSE_BUDGET_S


def test_one_task_per_existing_stage_in_order(dag):
    order = [t.task_id for t in dag.topological_sort()]
    assert order[: len(EXISTING_STAGES)] == EXISTING_STAGES
    for upstream, downstream in zip(EXISTING_STAGES, EXISTING_STAGES[1:]):
        assert upstream in dag.get_task(downstream).upstream_task_ids
    assert dag.get_task("decide").upstream_task_ids == {"gate"}
    assert dag.get_task("decide").downstream_task_ids == {"register", "report_no_change"}


def test_dag_settings(dag):
    assert dag.doc_md and "asr_weekly_retune" in dag.doc_md and "airflow pools set asr_compute" in dag.doc_md
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    minute, hour, dom, month, dow = dag.schedule.split()  # a weekly cron: one day of the week
    assert (dom, month) == ("*", "*") and dow.isdigit() and minute.isdigit() and hour.isdigit()
    assert dag.on_failure_callback


@pytest.mark.parametrize("task_id", EXISTING_STAGES + ["register", "deploy", "report_no_change"])
def test_task_retries_timeouts_pool_and_callbacks(dag, task_id):
    from pipeline.airflow import alerts

    t = dag.get_task(task_id)
    assert t.retries >= 2
    assert t.retry_exponential_backoff and t.retry_exponential_backoff > 1
    assert t.max_retry_delay is not None
    assert isinstance(t.execution_timeout, dt.timedelta) and t.execution_timeout > dt.timedelta(0)
    assert t.pool == ("asr_compute" if task_id in COMPUTE_HEAVY else "default_pool")
    assert alerts.on_failure in t.on_failure_callback
    assert alerts.on_retry in t.on_retry_callback
    assert t.retry_policy is not None
    # the run id reaches the task as a template, so the store partition is the Airflow run's
    assert t.op_kwargs["run_id"] == "{{ run_id }}"


def test_retry_policy_fails_fast_on_bad_configuration(dag):
    from airflow.sdk import RetryAction

    from pipeline.config import ConfigError

    policy = dag.get_task("train").retry_policy
    assert policy.evaluate(ConfigError("train.epochs: bad"), 1, 3).action == RetryAction.FAIL
    assert policy.evaluate(RuntimeError("worker lost"), 1, 3).action != RetryAction.FAIL


def test_assets(dag):
    outlets = dag.get_task("ingest").outlets
    assert [a.uri.rstrip("/") for a in outlets] == ["asr-retune://training-pool"]


def test_dag_serializes(dag):
    from airflow.serialization.serialized_objects import DagSerialization

    restored = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    assert sorted(restored.task_ids) == sorted(ALL_TASKS)


# --------------------------------------------------------------------------- params


def _resolve(dag, conf: dict) -> dict:
    params = copy.deepcopy(dag.params)
    params.update(conf)
    return params.validate()


def test_params_have_titles_and_descriptions(dag):
    for name in dag.params:
        p = dag.params.get_param(name)
        assert p.schema.get("title"), name
        assert p.description, name
        assert p.schema.get("type"), name


def test_default_params_validate(dag):
    resolved = _resolve(dag, {})
    assert resolved["epochs"] is None and resolved["proxy_fraction"] is None
    assert resolved["canary_steps"] == [5, 25, 100] and resolved["skip_deploy"] is False


def test_good_overrides_validate(dag):
    resolved = _resolve(dag, {"epochs": 3, "proxy_fraction": 0.5, "search_trials": 8, "canary_steps": [10, 100],
                              "force_promote": True, "force_reason": "INC-42"})
    assert resolved["epochs"] == 3 and resolved["proxy_fraction"] == 0.5


@pytest.mark.parametrize("conf", [
    {"epochs": "ten"},
    {"epochs": 0},
    {"epochs": 2.5},
    {"proxy_fraction": 0},
    {"proxy_fraction": 1.5},
    {"proxy_fraction": "half"},
    {"search_trials": -1},
    {"search_budget_minutes": "1h"},
    {"canary_steps": [5, 250]},
    {"canary_steps": []},
    {"canary_steps": "5,25,100"},
    {"skip_deploy": "yes"},
    {"force_promote": 1},
    {"force_reason": 42},
])
def test_bad_overrides_are_refused(dag, conf):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        _resolve(dag, conf)


# --------------------------------------------------------------------------- glue helpers


def _dag_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("asr_weekly_retune_under_test", DAGS_DIR / "asr_weekly_retune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_large_lists_stay_out_of_xcom():
    module = _dag_module()
    summary = {"accepted": 3, "quarantined": [{"line": i} for i in range(500)], "drops": ["week-001"]}
    out = module._for_xcom(summary)
    assert out == {"accepted": 3, "quarantined_count": 500, "drops": ["week-001"]}
    assert len(json.dumps(out)) < 200


def test_project_root_is_the_dags_parent():
    assert (PROJECT_ROOT / "pipeline" / "run.py").exists()
