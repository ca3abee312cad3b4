r"""
### asr_weekly_retune — weekly re-tuning and retraining of the speech recognizer

Every week this DAG takes the new incoming drops into the training pool, extracts
features, samples a stratified proxy, searches hyperparameters on it (Ray Tune ASHA +
Optuna TPE), trains the winner on the whole pool (Ray Train `TorchTrainer`, DDP), gates
the candidate against the production model on the golden set and, when it passes,
registers it in MLflow and runs a stepped canary on TorchServe that promotes it or rolls
it back:

    ingest → features → proxy → search → train → gate → decide ─┬→ register → deploy
                                                                └→ report_no_change

Each stage task imports `pipeline.stages.<task id>` inside its body and calls one
function there; the stage logic, its outputs and its retry semantics live in that module
(see `DESIGN.md`). `decide` is the branch on the gate's decision; `report_no_change` logs
the failing rules and the report's address when the gate refused the candidate.

**Run partitions.** A stage writes under `runs/{run_id}/{stage}/` of the configured store
(`storage.root`), where `run_id` is the Airflow run id (kept as is when it only holds
letters, digits and `_.:+-`, which Airflow's own ids do; `pipeline.run.store_run_id`). A
finished stage is skipped, a retried stage clears its own partition first, so a retry never
mixes with a failed attempt's leftovers. Data that outlives a run (pool, feature cache,
search history) lives under `state/`.

**Compute.** `features`, `search`, `train` and `gate` take a slot of the pool
`asr_compute`; heavy training runs on Ray (`ray.address` in the config: empty = a Ray
started inside the task's process, `auto` = the local cluster of `asr-retune cluster up`).
With `ray.submit: job` these four tasks submit their stage as a Ray Job (the CLI command of
the stage, on the cluster's head), stream its log into the task log and wait; a retried task
re-attaches to the job still running instead of starting a second one, and resubmits one
that failed (`pipeline/jobs.py`). Create the pool once per Airflow installation (a task in
a missing pool is never scheduled):

    airflow pools set asr_compute 1 "Ray-bound stages of asr_weekly_retune"

**Triggering by hand** with overrides (the *Trigger* form shows this DAG's parameters,
typed and validated; a bad value is refused before anything runs):

    airflow dags trigger asr_weekly_retune -c '{"epochs": 2, "proxy_fraction": 0.5}'

or through the REST API, with a token from the API server's auth endpoint (simple auth
manager: the users of `[core] simple_auth_manager_users`):

    TOKEN=$(curl -s -X POST "$AIRFLOW_URL/auth/token" -H 'Content-Type: application/json' \
                 -d '{"username": "...", "password": "..."}' | jq -r .access_token)
    curl -X POST "$AIRFLOW_URL/api/v2/dags/asr_weekly_retune/dagRuns" \
         -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
         -d '{"logical_date": null, "conf": {"epochs": 2, "proxy_fraction": 0.5}}'

A bad value (`"epochs": -1`, `"epochs": "ten"`) is answered 400 `Invalid input for param
epochs: …`; a key that is not a parameter (`"epoch": 3`) is answered 400 `unknown parameter
'epoch' (did you mean 'epochs'?) …` by plugin `plugins/asr_conf_guard.py` (REST API and the
UI); no run is created in either case. The `airflow dags trigger`/`dags test` CLI writes the run
to the DB directly: there the first task, `ingest`, fails the run with the same message before
any stage has run, and it is not retried.

**Alerts.** A failed task (after its retries) and a failed run write one
`ASR-RETUNE ALERT [...]` line to the log and call the hooks configured in the environment
(`pipeline/airflow/alerts.py`: Slack-style webhook, a Python hook for PagerDuty, a local file).

**On call.** *Browse → ASR gating reports* (plugin `plugins/asr_reports.py`) lists the
runs with their gate decision and serves each report.

**Assets.** `ingest` updates `asr-retune://training-pool` (extra: pool version and size);
`register` updates `asr-retune://registered-model`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from airflow.sdk import Asset, ExceptionRetryPolicy, Param, RetryAction, RetryRule, chain, dag, task

from pipeline.airflow import alerts

log = logging.getLogger(__name__)

DAG_ID = "asr_weekly_retune"
# Mondays 03:00 UTC unless the pipeline config's `orchestration.schedule` says otherwise
# (read at parse time from one local YAML file: no store, Ray, MLflow or DB access).
DEFAULT_SCHEDULE = "0 3 * * 1"
COMPUTE_POOL = "asr_compute"
RUN_ID = "{{ run_id }}"
# Test-only fault injection (pipeline/airflow/faults.py), imported only when this is set.
FAULT_ENV = "ASR_RETUNE_TEST_FAIL_ONCE"

TRAINING_POOL = Asset("asr-retune://training-pool")
REGISTERED_MODEL = Asset("asr-retune://registered-model")


def _weekly_schedule() -> str:
    from pipeline.config import load_config

    section = getattr(load_config(), "orchestration", None)
    return getattr(section, "schedule", None) or DEFAULT_SCHEDULE


def _run_context(airflow_run_id: str):
    from pipeline.config import load_config
    from pipeline.run import RunContext, store_run_id

    return RunContext.create(load_config(), run_id=store_run_id(airflow_run_id))


def _refuse_unknown_conf(context: Mapping[str, Any]) -> None:
    """Fail the run, without retries, if its ``conf`` holds a key that is not a parameter of this DAG: a
    trigger from the CLI (``airflow dags trigger``/``dags test``) bypasses the API server's check."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.airflow.conf import unknown_keys_message

    why = unknown_keys_message(DAG_ID, getattr(context.get("dag_run"), "conf", None) or {}, params)
    if why:
        raise AirflowFailException(why)


def _fault_point(ctx: Any, stage: str | None, context: Mapping[str, Any]):
    """Test-only hook around a stage call; a no-op unless ``ASR_RETUNE_TEST_FAIL_ONCE`` is set."""
    if not os.environ.get(FAULT_ENV):
        return contextlib.nullcontext()
    from pipeline.airflow.faults import fault_point

    return fault_point(ctx, stage, context)


def run_heavy_stage(ctx: Any, stage: str, call, cli_args: list[str] | None = None) -> dict[str, Any]:
    """``call()`` here, or the stage as a Ray Job (``ray.submit: job``; pipeline.jobs)."""
    from pipeline.jobs import run_heavy_stage as run

    return run(ctx, stage, call, cli_args or [])


def _cli_options(**options: Any) -> list[str]:
    """``--name value`` for each option that is set: the task's overrides as the job's CLI arguments."""
    out: list[str] = []
    for name, value in options.items():
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def _for_xcom(summary: Mapping[str, Any], max_items: int = 50) -> dict[str, Any]:
    """The stage summary as the task's XCom: a list longer than ``max_items`` is replaced by
    its length (``<key>_count``); the full summary stays in the stage's ``_SUCCESS``."""
    log.info("stage summary: %s", json.dumps(summary, sort_keys=True, default=str))
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, list) and len(value) > max_items:
            out[f"{key}_count"] = len(value)
        else:
            out[key] = value
    return out


# Fail at once (no retry) on errors a retry cannot fix.
NO_RETRY_ON_BAD_CONFIG = ExceptionRetryPolicy(
    rules=[
        RetryRule(
            exception="pipeline.config.ConfigError",
            action=RetryAction.FAIL,
            reason="the pipeline configuration is invalid; fix it and clear the task",
        ),
    ],
)

default_args: dict[str, Any] = {
    "owner": "ml-platform",
    "retries": 2,
    # retry_delay: Airflow's [core] default_task_retry_delay (300 s unless configured),
    # doubled on each retry, at most max_retry_delay.
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": dt.timedelta(hours=1),
    "retry_policy": NO_RETRY_ON_BAD_CONFIG,
    "on_failure_callback": alerts.on_failure,
    "on_retry_callback": alerts.on_retry,
}

SECTION_DATA = "Data and training"
SECTION_SEARCH = "Hyperparameter search"
SECTION_RELEASE = "Gate, canary and promotion"


def _optional(kind: str, title: str, description: str, section: str, **bounds: Any) -> Param:
    """A parameter that may be left empty (``null``: the config's value applies)."""
    return Param(None, type=["null", kind], title=title, description=description, section=section, **bounds)


params = {
    "proxy_fraction": _optional(
        "number", "Proxy fraction",
        "Share of the pool sampled (stratified) into the proxy set used by the search. "
        "Empty: proxy.fraction from the config. A run keeps the fraction its proxy was made with.",
        SECTION_DATA, exclusiveMinimum=0, maximum=1),
    "epochs": _optional(
        "integer", "Training epochs", "Epochs of full training on the whole pool. Empty: train.epochs from the config.",
        SECTION_DATA, minimum=1, maximum=1000),
    "search_trials": _optional(
        "integer", "Search trials", "Ray Tune trials (ASHA + Optuna TPE). Empty: search.trials from the config.",
        SECTION_SEARCH, minimum=1, maximum=1000),
    "search_budget_minutes": _optional(
        "integer", "Search budget (minutes)", "Wall-clock budget of the search. Empty: search.budget_s from the config.",
        SECTION_SEARCH, minimum=1, maximum=7 * 24 * 60),
    "canary_steps": Param(
        [5, 25, 100], type="array", items={"type": "integer", "minimum": 1, "maximum": 100}, minItems=1, maxItems=10,
        title="Canary traffic steps (%)",
        description="Traffic shares the new version gets, in order; the last one should be 100.",
        section=SECTION_RELEASE),
    "skip_deploy": Param(
        False, type="boolean", title="Skip deploy",
        description="Register a passing model but do not deploy it (production keeps serving).",
        section=SECTION_RELEASE),
    "force_promote": Param(
        False, type="boolean", title="Force promote",
        description="Pass the gate even if its rules fail; needs a reason, recorded in the decision, "
        "the report and the registry. Never the default.",
        section=SECTION_RELEASE),
    "force_reason": _optional(
        "string", "Reason for forcing", "Why the gate is overridden; required with Force promote.",
        SECTION_RELEASE, maxLength=500),
}


# --------------------------------------------------------------------------- the tasks
# Each imports pipeline.stages.<task id> in its body (nothing heavy at parse time) and calls
# one function there.


@task(task_id="ingest", task_display_name="Ingest new drops", execution_timeout=dt.timedelta(hours=2),
      outlets=[TRAINING_POOL])
def ingest(run_id: str, **context) -> dict[str, Any]:
    from pipeline.stages import ingest

    _refuse_unknown_conf(context)  # before the run's partition exists
    ctx = _run_context(run_id)
    with _fault_point(ctx, "ingest", context):
        summary = ingest.ingest(ctx, progress=False)
    context["outlet_events"][TRAINING_POOL].extra = {
        "run_id": ctx.run_id,
        "pool_version": summary.get("pool_version"),
        "pool_size": summary.get("pool_size"),
        "accepted": summary.get("accepted"),
    }
    return _for_xcom(summary)


@task(task_id="features", task_display_name="Extract features", execution_timeout=dt.timedelta(hours=3),
      pool=COMPUTE_POOL)
def features(run_id: str, **context) -> dict[str, Any]:
    from pipeline.stages import features

    ctx = _run_context(run_id)
    with _fault_point(ctx, "features", context):
        summary = run_heavy_stage(ctx, "features", lambda: features.extract_features(ctx, progress=False))
    return _for_xcom(summary)


@task(task_id="proxy", task_display_name="Sample proxy set", execution_timeout=dt.timedelta(minutes=30))
def proxy(run_id: str, **context) -> dict[str, Any]:
    from pipeline.stages import proxy

    ctx = _run_context(run_id)
    with _fault_point(ctx, "proxy", context):
        summary = proxy.sample_proxy(ctx, fraction=context["params"].get("proxy_fraction"))
    return _for_xcom(summary)


@task(task_id="search", task_display_name="Hyperparameter search (Ray Tune ASHA + Optuna TPE)",
      execution_timeout=dt.timedelta(hours=8), pool=COMPUTE_POOL)
def search(run_id: str, **context) -> dict[str, Any]:
    from pipeline.stages import search

    ctx, p = _run_context(run_id), context["params"]
    budget = p.get("search_budget_minutes")
    budget_s = None if budget is None else 60.0 * budget
    with _fault_point(ctx, "search", context):
        summary = run_heavy_stage(
            ctx, "search", lambda: search.search(ctx, trials=p.get("search_trials"), budget_s=budget_s, progress=False),
            _cli_options(trials=p.get("search_trials"), budget=budget_s))
    return _for_xcom(summary)


@task(task_id="train", task_display_name="Train on the full pool (Ray Train DDP)",
      execution_timeout=dt.timedelta(hours=12), pool=COMPUTE_POOL)
def train(run_id: str, hparams: dict[str, Any] | None = None, **context) -> dict[str, Any]:
    from pipeline.stages import train

    ctx, epochs = _run_context(run_id), context["params"].get("epochs")
    with _fault_point(ctx, "train", context):
        summary = run_heavy_stage(
            ctx, "train", lambda: train.train_full(ctx, hparams=hparams, epochs=epochs),
            _cli_options(epochs=epochs, hparams_json=json.dumps(hparams, sort_keys=True) if hparams else None))
    return _for_xcom(summary)


@task(task_id="gate", task_display_name="Gate: candidate vs production on the golden set",
      execution_timeout=dt.timedelta(hours=1), pool=COMPUTE_POOL)
def gate(run_id: str, **context) -> dict[str, Any]:
    from pipeline.stages import gate

    ctx, p = _run_context(run_id), context["params"]
    reason = gate.check_force(p.get("force_promote"), p.get("force_reason"))
    with _fault_point(ctx, "gate", context):
        summary = run_heavy_stage(ctx, "gate", lambda: gate.gate(ctx, force_reason=reason, actor="airflow"),
                                  _cli_options(force_reason=reason, actor="airflow"))
    return _for_xcom(summary)


@task.branch(task_id="decide", task_display_name="Passed the gate?")
def decide(decision: dict[str, Any]) -> str:
    return "register" if decision.get("passed") else "report_no_change"


@task(task_id="register", task_display_name="Register the candidate (MLflow, alias challenger)",
      execution_timeout=dt.timedelta(minutes=30), outlets=[REGISTERED_MODEL])
def register(run_id: str, **context) -> dict[str, Any]:
    from pipeline.stages import register

    ctx = _run_context(run_id)
    with _fault_point(ctx, "register", context):
        summary = register.register(ctx, actor="airflow")
    return _for_xcom(summary)


@task(task_id="report_no_change", task_display_name="No change: production keeps serving",
      execution_timeout=dt.timedelta(minutes=10))
def report_no_change(run_id: str, **context) -> dict[str, Any]:
    from pipeline.stages import gate

    ctx = _run_context(run_id)
    failing = gate.failing_rules(gate.read_decision(ctx))
    log.warning("gate failed for run %s (rules: %s); production unchanged; report: %s",
                ctx.run_id, ", ".join(failing) or "-", ctx.store.uri(ctx.stage_key("gate", "report.html")))
    return {"changed": False, "failing_rules": failing}


@task(task_id="deploy", task_display_name="Canary on TorchServe; promote or roll back",
      execution_timeout=dt.timedelta(hours=2))
def deploy(run_id: str, **context) -> dict[str, Any]:
    from airflow.sdk.exceptions import AirflowSkipException

    from pipeline.stages import deploy

    p = context["params"]
    if p.get("skip_deploy"):
        raise AirflowSkipException("skip_deploy: registered, not deployed; production keeps serving")
    ctx = _run_context(run_id)
    steps = [float(x) for x in p["canary_steps"]] if p.get("canary_steps") else None
    with _fault_point(ctx, "deploy", context):
        summary = deploy.deploy_registered(ctx, steps=steps)
    return _for_xcom(summary)


@dag(
    dag_id=DAG_ID,
    dag_display_name="ASR weekly retune",
    description="Weekly re-tuning and retraining of the ASR model, shipped only when measurably better",
    doc_md=__doc__,
    schedule=_weekly_schedule(),
    start_date=dt.datetime(2026, 1, 5, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=dt.timedelta(days=2),
    default_args=default_args,
    params=params,
    on_failure_callback=alerts.on_run_failure,
    tags=["asr", "ml", "weekly"],
)
def asr_weekly_retune():
    best = search(run_id=RUN_ID)
    decision = gate(run_id=RUN_ID)
    chain(ingest(run_id=RUN_ID), features(run_id=RUN_ID), proxy(run_id=RUN_ID), best,
          train(run_id=RUN_ID, hparams=best["best_config"]), decision)
    registered = register(run_id=RUN_ID)
    decide(decision) >> [registered, report_no_change(run_id=RUN_ID)]
    registered >> deploy(run_id=RUN_ID)


asr_weekly_retune()
