r"""
### asr_weekly_retune — weekly re-tuning and retraining of the speech recognizer

Every week this DAG takes the new incoming drops into the training pool, extracts
features, samples a stratified proxy, trains the model on the whole pool (Ray Train
`TorchTrainer`, DDP) and scores it on the golden set. Each task is a thin call into
`pipeline.<module>`; the stage logic, its outputs and its retry semantics live there
(see `DESIGN.md`). The stages that are not built yet (search, gate, register,
canary/deploy, promote) are **absent**, not faked: they are added one task each at the
marked places in this file.

**Run partitions.** A task writes under `runs/{run_id}/{stage}/` of the configured store
(`storage.root`), where `run_id` is the Airflow run id (kept as is when it only holds
letters, digits and `_.:+-`, which Airflow's own ids do). A finished stage is skipped, a
retried stage clears its own partition first, so a retry never mixes with a failed
attempt's leftovers. Data that outlives a run (pool, feature cache) lives under `state/`.

**Compute.** `features`, `search`, `train` and `gate` take a slot of the pool
`asr_compute`; heavy training runs on Ray (`ray.address` in the config: empty = a Ray
started inside the task's process, `ray://host:10001` = the cluster). Create the pool once
per Airflow installation (a task in a missing pool is never scheduled):

    airflow pools set asr_compute 1 "Ray-bound stages of asr_weekly_retune"

**Triggering by hand** with overrides (the *Trigger* form shows this DAG's parameters,
typed and validated; a bad value is refused before anything runs):

    airflow dags trigger asr_weekly_retune -c '{"epochs": 2, "proxy_fraction": 0.5}'
    curl -X POST "$AIRFLOW_URL/api/v2/dags/asr_weekly_retune/dagRuns" \
         -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
         -d '{"logical_date": null, "conf": {"epochs": 2, "proxy_fraction": 0.5}}'

Parameters marked *(not active yet)* are accepted and validated now but only take effect
when their stage lands; until then the first task logs a warning if one is set.

**Alerts.** A failed task (after its retries) and a failed run write one
`ASR-RETUNE ALERT [...]` line to the log and call the hooks configured in the environment
(`pipeline/airflow/alerts.py`: Slack-style webhook, a Python hook for PagerDuty, a local file).

**On call.** *Browse → ASR gating reports* (plugin `plugins/asr_reports.py`) lists the
runs with their gate decision and serves each report.

**Assets.** `ingest` updates `asr-retune://training-pool` (extra: pool version and size);
`register` will update `asr-retune://registered-model` when it lands.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from airflow.sdk import Asset, ExceptionRetryPolicy, Param, RetryAction, RetryRule, chain, dag, task

from pipeline.airflow import alerts

log = logging.getLogger(__name__)

DAG_ID = "asr_weekly_retune"
# Mondays 03:00 UTC. Read at parse time from the pipeline config's `orchestration.schedule`
# when that field exists (it is one local YAML file: no store, Ray, MLflow or DB access);
# this constant is the default until then.
DEFAULT_SCHEDULE = "0 3 * * 1"
COMPUTE_POOL = "asr_compute"
RUN_ID = "{{ run_id }}"

TRAINING_POOL = Asset("asr-retune://training-pool")
# Outlet of the `register` task when it lands (other DAGs can already schedule on it).
REGISTERED_MODEL = Asset("asr-retune://registered-model")

# Test-only fault injection: "task_id[:before|:after],..." makes each named task fail on
# its first try only, either before calling its stage ("before", the default) or after
# the stage wrote its outputs, with its completion marker removed and a stray file left
# in its partition ("after": a crash just before the commit). Never set in production.
FAULT_ENV = "ASR_RETUNE_TEST_FAIL_ONCE"

# Parameters whose stage is not in this DAG yet, with their defaults: a run that sets one
# to anything else gets a warning. Remove a name when its stage lands.
INACTIVE_PARAMS: dict[str, Any] = {}

_SAFE_RUN_ID = re.compile(r"[^A-Za-z0-9_.:+\-]")


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook (``ASR_RETUNE_TEST_FAIL_ONCE``)."""


def _weekly_schedule() -> str:
    from pipeline.config import load_config

    section = getattr(load_config(), "orchestration", None)
    return getattr(section, "schedule", None) or DEFAULT_SCHEDULE


def store_run_id(airflow_run_id: str) -> str:
    """The store's run id for an Airflow run id.

    Airflow's ids (``manual__2026-11-28T10:00:00+00:00``, ``scheduled__...``) are kept as
    they are, so a run's folder is named after its Airflow run. Any other character is
    replaced by ``_`` and a short hash of the original is appended, so two different ids
    never share a folder.
    """
    safe = _SAFE_RUN_ID.sub("_", airflow_run_id)
    if safe and safe[0].isalnum() and safe == airflow_run_id and len(safe) <= 200:
        return safe
    digest = hashlib.sha256(airflow_run_id.encode("utf-8")).hexdigest()[:12]
    head = safe.lstrip("_.:+-")[:180] or "run"
    return f"{head}__{digest}"


def _run_context(airflow_run_id: str):
    from pipeline.config import load_config
    from pipeline.run import RunContext

    return RunContext.create(load_config(), run_id=store_run_id(airflow_run_id))


def _fault_plan() -> dict[str, str]:
    plan = {}
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, when = item.strip().partition(":")
        if name:
            if (when or "before") not in ("before", "after"):
                raise ValueError(f"{FAULT_ENV}: {item.strip()!r}: the phase is 'before' or 'after'")
            plan[name] = when or "before"
    return plan


@contextlib.contextmanager
def _fault_point(ctx: Any, stage: str | None, context: Mapping[str, Any]) -> Iterator[None]:
    """Test-only: fail the first try of a task named in ``ASR_RETUNE_TEST_FAIL_ONCE``."""
    ti = context["ti"]
    when = _fault_plan().get(ti.task_id) if ti.try_number == 1 else None
    if when is None:
        yield
        return

    def leave_debris() -> None:
        if stage is not None:
            ctx.store.put_text(ctx.stage_key(stage, "_debris_of_failed_attempt"), "partial output\n")

    if when == "before":
        leave_debris()
        raise InjectedFault(f"{FAULT_ENV}: {ti.task_id} fails its first try before its stage runs")
    yield
    if stage is not None:
        from pipeline.run import SUCCESS

        ctx.store.delete(ctx.stage_key(stage, SUCCESS))
    leave_debris()
    raise InjectedFault(f"{FAULT_ENV}: {ti.task_id} fails its first try after its stage wrote, before its commit")


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


def _warn_inactive(params: Mapping[str, Any]) -> None:
    for name, default in INACTIVE_PARAMS.items():
        if name in params and params[name] != default:
            log.warning("parameter %s=%r is set, but its stage is not in this DAG yet: ignored", name, params[name])


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

params = {
    "proxy_fraction": Param(
        None,
        type=["null", "number"],
        exclusiveMinimum=0,
        maximum=1,
        title="Proxy fraction",
        description="Share of the pool sampled (stratified) into the proxy set used by the search. "
        "Empty: proxy.fraction from the config. A run keeps the fraction its proxy was made with.",
        section=SECTION_DATA,
    ),
    "epochs": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=1000,
        title="Training epochs",
        description="Epochs of full training on the whole pool. Empty: train.epochs from the config.",
        section=SECTION_DATA,
    ),
    "search_trials": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=1000,
        title="Search trials",
        description="Ray Tune trials (ASHA + Optuna TPE). Empty: search.trials from the config.",
        section=SECTION_SEARCH,
    ),
    "search_budget_minutes": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=7 * 24 * 60,
        title="Search budget (minutes)",
        description="Wall-clock budget of the search. Empty: search.budget_s from the config.",
        section=SECTION_SEARCH,
    ),
    "canary_steps": Param(
        [5, 25, 100],
        type="array",
        items={"type": "integer", "minimum": 1, "maximum": 100},
        minItems=1,
        maxItems=10,
        title="Canary traffic steps (%)",
        description="Traffic shares the new version gets, in order; the last one should be 100.",
        section=SECTION_RELEASE,
    ),
    "skip_deploy": Param(
        False,
        type="boolean",
        title="Skip deploy",
        description="Register a passing model but do not deploy it (production keeps serving).",
        section=SECTION_RELEASE,
    ),
    "force_promote": Param(
        False,
        type="boolean",
        title="Force promote",
        description="Pass the gate even if its rules fail; needs a reason, recorded in the decision, "
        "the report and the registry. Never the default.",
        section=SECTION_RELEASE,
    ),
    "force_reason": Param(
        None,
        type=["null", "string"],
        maxLength=500,
        title="Reason for forcing",
        description="Why the gate is overridden; required with Force promote.",
        section=SECTION_RELEASE,
    ),
}


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
    @task(
        task_id="ingest",
        task_display_name="Ingest new drops",
        execution_timeout=dt.timedelta(hours=2),
        outlets=[TRAINING_POOL],
    )
    def ingest(run_id: str, **context) -> dict[str, Any]:
        from pipeline.stages.ingest.stage import ingest as run_ingest

        _warn_inactive(context["params"])
        ctx = _run_context(run_id)
        with _fault_point(ctx, "ingest", context):
            summary = run_ingest(ctx, progress=False)
        context["outlet_events"][TRAINING_POOL].extra = {
            "run_id": ctx.run_id,
            "pool_version": summary.get("pool_version"),
            "pool_size": summary.get("pool_size"),
            "accepted": summary.get("accepted"),
        }
        return _for_xcom(summary)

    @task(
        task_id="features",
        task_display_name="Extract features",
        execution_timeout=dt.timedelta(hours=3),
        pool=COMPUTE_POOL,
    )
    def features(run_id: str, **context) -> dict[str, Any]:
        from pipeline.stages.features import extract_features

        ctx = _run_context(run_id)
        with _fault_point(ctx, "features", context):
            summary = extract_features(ctx, progress=False)
        return _for_xcom(summary)

    @task(
        task_id="proxy",
        task_display_name="Sample proxy set",
        execution_timeout=dt.timedelta(minutes=30),
    )
    def proxy(run_id: str, **context) -> dict[str, Any]:
        from pipeline.stages.proxy import sample_proxy

        ctx = _run_context(run_id)
        with _fault_point(ctx, "proxy", context):
            summary = sample_proxy(ctx, fraction=context["params"].get("proxy_fraction"))
        return _for_xcom(summary)

    @task(
        task_id="search",
        task_display_name="Hyperparameter search (Ray Tune ASHA + Optuna TPE)",
        execution_timeout=dt.timedelta(hours=8),
        pool=COMPUTE_POOL,
    )
    def search(run_id: str, **context) -> dict[str, Any]:
        from pipeline.stages.search.stage import search as run_search

        ctx, p = _run_context(run_id), context["params"]
        budget = p.get("search_budget_minutes")
        with _fault_point(ctx, "search", context):
            summary = run_search(ctx, trials=p.get("search_trials"),
                                 budget_s=None if budget is None else 60.0 * budget, progress=False)
        return _for_xcom(summary)

    @task(
        task_id="train",
        task_display_name="Train on the full pool (Ray Train DDP)",
        execution_timeout=dt.timedelta(hours=12),
        pool=COMPUTE_POOL,
    )
    def train(run_id: str, hparams: dict[str, Any] | None = None, **context) -> dict[str, Any]:
        from pipeline.stages.train import train_full

        ctx = _run_context(run_id)
        with _fault_point(ctx, "train", context):
            summary = train_full(ctx, hparams=hparams, epochs=context["params"].get("epochs"))
        return _for_xcom(summary)

    @task(
        task_id="gate",
        task_display_name="Gate: candidate vs production on the golden set",
        execution_timeout=dt.timedelta(hours=1),
        pool=COMPUTE_POOL,
    )
    def gate(run_id: str, **context) -> dict[str, Any]:
        from pipeline.stages.gate.stage import gate as run_gate

        ctx, p = _run_context(run_id), context["params"]
        if p.get("force_promote") and not (p.get("force_reason") or "").strip():
            raise ValueError("force_promote needs force_reason: say why the gate is overridden (it is recorded)")
        reason = p.get("force_reason") if p.get("force_promote") else None
        with _fault_point(ctx, "gate", context):
            summary = run_gate(ctx, force_reason=reason, actor="airflow")
        return _for_xcom(summary)

    @task.branch(task_id="decide", task_display_name="Passed the gate?")
    def decide(decision: dict[str, Any]) -> str:
        return "register" if decision.get("passed") else "report_no_change"

    @task(
        task_id="register",
        task_display_name="Register the candidate (MLflow, alias challenger)",
        execution_timeout=dt.timedelta(minutes=30),
        outlets=[REGISTERED_MODEL],
    )
    def register(run_id: str, **context) -> dict[str, Any]:
        from pipeline.stages.register import register as run_register

        ctx = _run_context(run_id)
        with _fault_point(ctx, "register", context):
            summary = run_register(ctx, actor="airflow")
        return _for_xcom(summary)

    @task(
        task_id="report_no_change",
        task_display_name="No change: production keeps serving",
        execution_timeout=dt.timedelta(minutes=10),
    )
    def report_no_change(run_id: str, **context) -> dict[str, Any]:
        from pipeline.stages.gate.stage import read_decision

        ctx = _run_context(run_id)
        decision = read_decision(ctx)
        failing = [r["name"] for r in decision.get("rules", []) if not r.get("passed")]
        log.warning("gate failed for run %s (rules: %s); production unchanged; report: %s",
                    ctx.run_id, ", ".join(failing) or "-", ctx.store.uri(ctx.stage_key("gate", "report.html")))
        return {"changed": False, "failing_rules": failing}

    @task(
        task_id="deploy",
        task_display_name="Canary on TorchServe; promote or roll back",
        execution_timeout=dt.timedelta(hours=2),
    )
    def deploy(run_id: str, **context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.stages.deploy.stage import deploy_registered

        p = context["params"]
        if p.get("skip_deploy"):
            raise AirflowSkipException("skip_deploy: registered, not deployed; production keeps serving")
        ctx = _run_context(run_id)
        if p.get("canary_steps"):
            ctx.config.canary.steps = [float(x) for x in p["canary_steps"]]
        with _fault_point(ctx, "deploy", context):
            summary = deploy_registered(ctx)
        return _for_xcom(summary)


    pooled = ingest(run_id=RUN_ID)
    feats = features(run_id=RUN_ID)
    proxy_set = proxy(run_id=RUN_ID)
    best = search(run_id=RUN_ID)
    candidate = train(run_id=RUN_ID, hparams=best["best_config"])
    decision = gate(run_id=RUN_ID)
    chain(pooled, feats, proxy_set, best, candidate, decision)
    registered = register(run_id=RUN_ID)
    decide(decision) >> [registered, report_no_change(run_id=RUN_ID)]
    registered >> deploy(run_id=RUN_ID)


asr_weekly_retune()
