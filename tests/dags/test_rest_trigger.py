"""Triggering ``asr_weekly_retune`` through Airflow's REST API, as the README documents it.

A real ``airflow api-server`` on 127.0.0.1 (throw-away home, SQLite, the DAG written to the
metadata DB by ``airflow dags reserialize``, the project's plugins), whose simple auth manager
knows an operator and a viewer: a token from ``POST /auth/token``, then
``POST /api/v2/dags/asr_weekly_retune/dagRuns`` with ``{"logical_date": null, "conf": …}``.

Default suite (~1 min on 2 cores): the token; a good ``conf`` is accepted and read back from
the run; a bad value, a wrong type and an unknown key are each refused with a 400 naming the
parameter, and no run is created; the unknown-key check (plugin ``plugins/asr_conf_guard.py``)
answers only callers who may trigger; the triggered run executes (``scheduler`` +
``dag-processor``, LocalExecutor, the tiny demo corpus) up to ``proxy``, the first task that
reads a parameter, and its partition shows the override.

``slow`` (4-5 min): the whole triggered run; ``proxy``, ``search`` and ``train`` each show theirs.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import requests
from support.dag_env import API_USERS, DAG_ID, TINY, AirflowProcesses, api_server_env

from pipeline.serving.ports import free_port

# 40 utterances: the configured proxy fraction (0.3) leaves no dev set, so the run needs its override;
# TINY configures 1 epoch and 2 search trials, so 2 and 1 are visibly the overrides
CONF = {"proxy_fraction": 0.6, "epochs": 2, "search_trials": 1, "skip_deploy": True}
NEVER = "0 3 29 2 *"  # no scheduled run interferes (next one in 2028)
TRIGGER = f"/api/v2/dags/{DAG_ID}/dagRuns"
OPERATOR, VIEWER = "ops", "watcher"

pytestmark = pytest.mark.timeout(900)


class Api:
    """The API server's REST API, as a client with a user's token sees it."""

    def __init__(self, base: str, processes: AirflowProcesses):
        self.base, self.processes = base, processes
        self._tokens: dict[str, str] = {}

    def login(self, username: str, password: str) -> requests.Response:
        return requests.post(f"{self.base}/auth/token", json={"username": username, "password": password},
                             timeout=30)

    def token(self, user: str) -> str:
        if user not in self._tokens:
            r = self.login(user, API_USERS[user][1])
            assert r.status_code == 201, r.text
            self._tokens[user] = r.json()["access_token"]
        return self._tokens[user]

    def call(self, method: str, path: str, user: str | None = OPERATOR, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        return requests.request(method, self.base + path, headers=headers, timeout=60, **kwargs)

    def trigger(self, conf: dict, user: str | None = OPERATOR) -> requests.Response:
        return self.call("POST", TRIGGER, user, json={"logical_date": None, "conf": conf})

    def run_ids(self) -> list[str]:
        r = self.call("GET", TRIGGER, params={"limit": 100})
        assert r.status_code == 200, r.text
        return sorted(run["dag_run_id"] for run in r.json()["dag_runs"])


@contextlib.contextmanager
def _api_server(tmp: Path):
    """A migrated home with the pool and the DAG (paused), its ``api-server`` up; stopped after."""
    port = free_port()
    env = api_server_env(
        tmp, port, **TINY,
        ASR_RETUNE__ORCHESTRATION__SCHEDULE=NEVER,
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY="1",
    )
    af = AirflowProcesses(tmp, env)
    t0 = time.perf_counter()
    af.run("db", "migrate")
    af.run("pools", "set", "asr_compute", "1", "Ray-bound stages of asr_weekly_retune")
    af.run("dags", "reserialize")  # the DAG in the metadata DB (paused: dags_are_paused_at_creation)
    api = Api(f"http://127.0.0.1:{port}", af)
    try:
        af.start("api-server", "api-server", "--port", str(port))

        def healthy() -> bool:
            try:
                return requests.get(f"{api.base}/api/v2/monitor/health", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        af.wait_for("the api-server", healthy, 180, every=0.5)
        print(f"api-server up {time.perf_counter() - t0:.1f} s after set-up began (logs: {tmp})")
        yield api
    finally:
        af.stop()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with _api_server(tmp_path_factory.mktemp("rest-trigger")) as api:
        yield api


@contextlib.contextmanager
def _scheduling(api: Api):
    """The tiny demo corpus in the store, the DAG's queued runs deleted, ``dag-processor`` and
    ``scheduler`` running; the DAG is still paused (:func:`_unpause`); paused and stopped after."""
    from pipeline.config import load_config
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.storage import open_store

    config = load_config(environ=api.processes.env)
    if not (Path(config.storage.root) / "incoming").exists():
        build_demo_corpus(open_store(None, config.storage), config.demo, config.audio.sample_rate, progress=False)
    for old in api.run_ids():  # runs queued by other tests would run first (max_active_runs=1)
        assert api.call("DELETE", f"{TRIGGER}/{old}").status_code == 204
    af = api.processes
    af.start("dag-processor", "dag-processor")
    af.start("scheduler", "scheduler")
    try:
        yield config
    finally:
        api.call("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": True})
        af.stop("scheduler", "dag-processor")


def _unpause(api: Api) -> None:
    r = api.call("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
    assert r.status_code == 200 and r.json()["is_paused"] is False, r.text


def _finished_run(api: Api, run_id: str, timeout: float) -> tuple[dict, dict[str, str]]:
    """The run once it succeeded or failed, and its task instances' states."""
    def finished() -> dict | None:
        run = api.call("GET", f"{TRIGGER}/{run_id}").json()
        return run if run["state"] in ("success", "failed") else None

    run = api.processes.wait_for(f"run {run_id} to finish", finished, timeout, every=1)
    tis = api.call("GET", f"{TRIGGER}/{run_id}/taskInstances").json()["task_instances"]
    return run, {t["task_id"]: t["state"] for t in tis}


def _partition_summary(store_root: Path, run_id: str, stage: str) -> dict:
    from pipeline.run import store_run_id

    return json.loads((store_root / "runs" / store_run_id(run_id) / stage / "_SUCCESS").read_text())


def test_the_guard_plugin_is_registered():
    from airflow import plugins_manager

    assert not any("asr_conf_guard" in k for k in plugins_manager.get_import_errors())
    _, middlewares = plugins_manager.get_fastapi_plugins()
    (guard,) = [m for m in middlewares if m["name"] == "asr_weekly_retune conf guard"]
    assert guard["kwargs"] == {"dag_ids": (DAG_ID,)}
    assert guard["middleware"].__module__.endswith("asr_conf_guard")


def test_token_from_the_auth_endpoint(api):
    r = api.login(OPERATOR, API_USERS[OPERATOR][1])
    assert r.status_code == 201 and r.json()["access_token"].count(".") == 2  # a JWT
    assert api.login(OPERATOR, "not-the-password").status_code == 401
    assert api.trigger(CONF, user=None).status_code == 401  # the API needs the token


def test_trigger_with_conf_is_accepted_and_read_back(api):
    before = api.run_ids()
    r = api.trigger(CONF)
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["conf"] == CONF and run["state"] == "queued"
    assert run["run_type"] == "manual" and run["triggered_by"] == "rest_api"
    assert run["triggering_user_name"] == OPERATOR
    back = api.call("GET", f"{TRIGGER}/{run['dag_run_id']}")
    assert back.status_code == 200 and back.json()["conf"] == CONF
    assert api.run_ids() == sorted([*before, run["dag_run_id"]])


@pytest.mark.parametrize(("conf", "names"), [
    ({"epochs": -1}, ["Invalid input for param epochs:", "less than the minimum of 1"]),
    ({"epochs": "ten"}, ["Invalid input for param epochs:", "is not of type"]),
    ({"proxy_fraction": 1.5, "epochs": 2}, ["Invalid input for param proxy_fraction:"]),
    ({"canary_steps": [5, 250]}, ["Invalid input for param canary_steps:"]),
    ({"epoch": 3}, ["unknown parameter 'epoch' (did you mean 'epochs'?)", "its parameters are: canary_steps, epochs,"]),
    ({**CONF, "skip_deploi": True, "color": "red"},
     ["unknown parameters 'color', 'skip_deploi' (did you mean 'skip_deploy'?)"]),
], ids=["epochs-below-minimum", "epochs-wrong-type", "fraction-above-maximum", "canary-step-over-100",
        "unknown-key", "two-unknown-keys-beside-good-ones"])
def test_bad_conf_is_refused_naming_the_parameter_and_creates_no_run(api, conf, names):
    before = api.run_ids()
    r = api.trigger(conf)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for name in names:
        assert name in detail, detail
    assert api.run_ids() == before


def test_unknown_key_check_answers_only_callers_who_may_trigger(api):
    before = api.run_ids()
    r = api.trigger({"epoch": 3}, user=None)
    assert r.status_code == 401 and "its parameters" not in r.text
    r = api.trigger({"epoch": 3}, user=VIEWER)  # may read the DAG, not trigger it
    assert r.status_code == 403 and "its parameters" not in r.text
    assert api.call("GET", f"/api/v2/dags/{DAG_ID}", user=VIEWER).status_code == 200
    assert api.run_ids() == before


def test_other_requests_pass_the_guard_untouched(api):
    r = requests.post(api.base + TRIGGER, data=b"[1, 2]", timeout=30, headers={
        "Authorization": f"Bearer {api.token(OPERATOR)}", "Content-Type": "application/json"})
    assert r.status_code == 422  # Airflow's own body validation
    r = api.call("POST", "/api/v2/dags/no_such_dag/dagRuns", json={"logical_date": None, "conf": {"epoch": 3}})
    assert r.status_code == 404


# --------------------------------------------------------------------------- the run itself


def test_the_triggered_run_executes_and_its_proxy_uses_the_override(api):
    """The run until ``proxy``, the first task that reads a parameter: ``search`` and what follows
    it are marked skipped through the API before the run starts, so no Ray or training runs."""
    t0 = time.perf_counter()
    with _scheduling(api) as config:
        r = api.trigger(CONF)
        assert r.status_code == 200, r.text
        run_id = r.json()["dag_run_id"]
        r = api.call("PATCH", f"{TRIGGER}/{run_id}/taskInstances/search",
                     json={"new_state": "skipped", "include_downstream": True})
        assert r.status_code == 200, r.text
        _unpause(api)
        run, states = _finished_run(api, run_id, 300)
    print(f"run {run_id}: {run['state']} in {time.perf_counter() - t0:.0f} s; {states}")
    assert run["state"] == "success" and run["conf"] == CONF, (states, api.processes.log_tail("scheduler"))
    assert states == {"ingest": "success", "features": "success", "proxy": "success"} | dict.fromkeys(
        ("search", "train", "gate", "decide", "register", "report_no_change", "deploy"), "skipped")
    proxy = _partition_summary(Path(config.storage.root), run_id, "proxy")
    assert proxy["fraction"] == CONF["proxy_fraction"] != config.proxy.fraction


@pytest.mark.slow
def test_the_triggered_run_runs_with_the_overrides(tmp_path):
    """The whole run (4-5 min on 2 busy cores): proxy, search and train each show their override."""
    t0 = time.perf_counter()
    with _api_server(tmp_path) as api, _scheduling(api) as config:
        r = api.trigger(CONF)
        assert r.status_code == 200, r.text
        run_id = r.json()["dag_run_id"]
        _unpause(api)
        run, states = _finished_run(api, run_id, 840)
    print(f"run {run_id}: {run['state']} in {time.perf_counter() - t0:.0f} s (logs: {tmp_path}); {states}")
    assert run["state"] == "success" and run["conf"] == CONF, (states, api.processes.log_tail("scheduler"))
    # two epochs on 40 utterances cannot pass the gate's WER ceiling: no register, no deploy
    assert states == dict.fromkeys(("ingest", "features", "proxy", "search", "train", "gate", "decide",
                                    "report_no_change"), "success") | {"register": "skipped", "deploy": "skipped"}
    root = Path(config.storage.root)
    assert _partition_summary(root, run_id, "proxy")["fraction"] == CONF["proxy_fraction"] != config.proxy.fraction
    assert _partition_summary(root, run_id, "search")["trials"] == CONF["search_trials"] != config.search.trials
    assert _partition_summary(root, run_id, "train")["epochs"] == CONF["epochs"] != config.train.epochs
