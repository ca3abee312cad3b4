"""Heavy stages as Ray Jobs: submit, follow, re-attach, resubmit.

With ``ray.submit: job`` the caller (an Airflow task) does not run a heavy stage itself: it submits
``asr-retune STAGE --run-id ID --root ROOT ...`` as a Ray Job (``JobSubmissionClient``, the head's
dashboard), streams the job's logs into its own log and waits. The job keeps running when the caller
dies, so a retried call re-attaches to it: the submission id is derived from the run id and the stage
(not from the caller's try number), and the record ``runs/{run_id}/_work/{stage}/job.json`` (the work
area, which a retried stage does not clear) names the current attempt:

* PENDING or RUNNING: attach and follow it; no second job starts;
* SUCCEEDED: the stage's own ``_SUCCESS`` is the result;
* FAILED or STOPPED: submit the next attempt (id suffix ``-2``, ``-3`` ...); the stage restores its
  experiment from its checkpoints (search: ``Tuner.restore``, train: Ray Train's resume);
* unknown to the cluster (its head restarted): submit the same id again.

The job loads the same configuration: this process's file (``ASR_RETUNE_CONFIG``) and its
``ASR_RETUNE__*`` overrides go into the job's ``runtime_env`` env vars (visible in the dashboard: keep
secrets out of them). The code is not uploaded: the local cluster shares this machine's environment,
and production's Ray image holds the package. The final ``_SUCCESS`` summary carries ``job_id``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config, load_config
from pipeline.config.loader import ENV_FILE, ENV_PREFIX, resolve_config_path
from pipeline.run import RunContext
from pipeline.storage import join

log = logging.getLogger(__name__)

RECORD = "job.json"
ACTIVE = ("PENDING", "RUNNING")
POLL_S = 2.0
UNREACHABLE_S = 120.0  # how long the Jobs API may stay unreachable while a job is followed
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class JobError(RuntimeError):
    """A stage could not be run or followed as a Ray Job; the message says why and what to do."""


class JobFailed(JobError):
    """The stage's Ray Job ended FAILED or STOPPED (a retry submits the next attempt)."""


def run_heavy_stage(ctx: RunContext, stage: str, call: Callable[[], dict[str, Any]],
                    cli_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run a heavy stage as ``ray.submit`` says: ``call()`` in this process (``driver``), or the CLI's
    ``stage`` command with ``cli_args`` as a Ray Job (``job``, :func:`submit_stage`)."""
    if ctx.config.ray.submit == "job":
        return submit_stage(ctx, stage, cli_args)
    return call()


def submission_id(run_id: str, stage: str, attempt: int = 1) -> str:
    """The job's submission id for ``attempt`` of ``stage`` in run ``run_id``: the same in every caller."""
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:8]
    base = f"asr-retune-{stage}-{_SAFE.sub('_', run_id)[:80]}-{digest}"
    return base if attempt == 1 else f"{base}-{attempt}"


def record_key(ctx: RunContext, stage: str) -> str:
    return join("runs", ctx.run_id, "_work", stage, RECORD)


def read_job_record(ctx: RunContext, stage: str) -> dict[str, Any] | None:
    """The record of the stage's job (current attempt, its id and status, earlier attempts), or None."""
    key = record_key(ctx, stage)
    return json.loads(ctx.store.get_text(key)) if ctx.store.exists(key) else None


def _write_record(ctx: RunContext, record: dict[str, Any]) -> None:
    record["updated_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    ctx.store.put_text(record_key(ctx, record["stage"]), json.dumps(record, indent=2, sort_keys=True))


def dashboard_url(config: Config) -> str:
    """The Ray Jobs API: ``ray.dashboard_url``, or with ``ray.address: auto`` the local cluster's (whose
    auth mode this process then uses)."""
    if config.ray.dashboard_url:
        return config.ray.dashboard_url.rstrip("/")
    if config.ray.address == "auto":
        from pipeline.cluster import cluster_spec, read_state
        from pipeline.cluster.state import use_auth

        spec = cluster_spec(config)
        state = read_state(spec)
        if state is None:
            raise JobError(f"ray.submit: job with ray.address: auto needs the local cluster, but none is up (no "
                           f"record at {spec.state_file}): run `asr-retune cluster up`, or set ray.dashboard_url")
        use_auth(state["auth_mode"])
        return state["dashboard_url"]
    raise JobError(f"ray.submit: job needs ray.dashboard_url (the head's dashboard, http://HOST:8265) for "
                   f"ray.address {config.ray.address!r}")


def job_client(config: Config):
    """A ``JobSubmissionClient`` of the configured cluster (raises :class:`JobError` when unreachable)."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(config)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as exc:
        raise JobError(f"cannot reach the Ray Jobs API at {url}: {exc}; is the cluster up (`asr-retune cluster "
                       "status`) and ray.dashboard_url right?") from exc


def job_entrypoint(ctx: RunContext, stage: str, cli_args: Sequence[str] = ()) -> str:
    """The job's shell command: the CLI's ``stage`` command for this run and store."""
    program = ctx.config.ray.job_entrypoint
    if program:
        cmd = shlex.split(program)
    else:
        sibling = Path(sys.executable).with_name("asr-retune")
        cmd = [str(sibling) if sibling.exists() else "asr-retune"]
    cmd += [stage, "--run-id", ctx.run_id, "--root", ctx.store.root, "--quiet", "--json", *cli_args]
    return shlex.join(cmd)


def job_env(ctx: RunContext, config_path: str | os.PathLike | None = None) -> dict[str, str]:
    """The job's env vars: the configuration file and the ``ASR_RETUNE__*`` overrides of this process,
    after checking that they give the job this process's configuration."""
    path = Path(resolve_config_path(config_path)).resolve()
    seen = _config_as_job_sees_it(path)
    mine, theirs = ctx.config.model_dump(mode="json"), seen.model_dump(mode="json")
    for cfg in (mine, theirs):
        cfg["storage"].pop("root", None)  # the job gets --root
    differ = sorted(k for k in mine if mine[k] != theirs.get(k))
    if differ:
        raise JobError(f"the job would load {path} (with this process's {ENV_PREFIX}* overrides), whose "
                       f"{', '.join(differ)} differ from this run's configuration: pass the file this "
                       f"configuration came from (config_path, or {ENV_FILE})")
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    env[ENV_FILE] = str(path)
    return env


def _config_as_job_sees_it(path: Path) -> Config:
    try:
        return load_config(path)
    except Exception as exc:  # noqa: BLE001 - ConfigError or a missing file: say which
        raise JobError(f"the job's configuration {path} does not load here: {exc}") from exc


def submit_stage(ctx: RunContext, stage: str, cli_args: Sequence[str] = (), *,
                 echo: Callable[[str], None] | None = None, config_path: str | os.PathLike | None = None,
                 poll_s: float = POLL_S) -> dict[str, Any]:
    """Run ``stage`` of this run as a Ray Job, or re-attach to the one already running; stream its logs to
    ``echo`` (default: this module's log) and wait. Returns the stage's summary with ``job_id``; raises
    :class:`JobFailed` when the job fails (a retry submits the next attempt)."""
    if ctx.is_complete(stage):
        return {**ctx.summary(stage), "skipped": True}
    echo = echo or (lambda line: log.info("[%s job] %s", stage, line))
    client = job_client(ctx.config)
    record = read_job_record(ctx, stage)
    sid = _attach_or_submit(ctx, client, stage, cli_args, record, config_path)
    record = read_job_record(ctx, stage)
    status, info = _follow(client, sid, echo, poll_s)
    record.update(status=status, message=_headline(info.message))
    _write_record(ctx, record)
    if status != "SUCCEEDED":
        raise JobFailed(f"Ray job {sid} (stage {stage}, attempt {record['attempt']}) ended {status}: "
                        f"{record['message']}; its log is above and at {dashboard_url(ctx.config)}/#/jobs/{sid}; "
                        "a retry submits the next attempt, which resumes from the stage's checkpoints")
    if not ctx.is_complete(stage):
        raise JobError(f"Ray job {sid} succeeded but stage {stage} of run {ctx.run_id} is not marked complete "
                       f"({ctx.store.uri(ctx.stage_key(stage, '_SUCCESS'))} is missing): see the job's log")
    summary = {**ctx.summary(stage), "job_id": sid, "job_attempt": record["attempt"]}
    ctx.mark_complete(stage, summary)
    return {**summary, "skipped": False}


def _headline(message: str | None) -> str:
    """The first line of a job's status message, without the log tail Ray appends (the log is echoed)."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else "no message"
    return first.split(", last available logs")[0]


def _attach_or_submit(ctx: RunContext, client, stage: str, cli_args: Sequence[str],
                      record: dict[str, Any] | None, config_path) -> str:
    """The submission id to follow: the recorded job when it is active, else a new submission."""
    attempt = 1
    if record is not None:
        sid, attempt = record["submission_id"], record["attempt"]
        status = _status(client, sid)
        if status in ACTIVE:
            log.info("re-attaching to Ray job %s of stage %s (%s, attempt %d)", sid, stage, status, attempt)
            return sid
        if status is not None:  # ended without the stage complete: the next attempt
            log.warning("Ray job %s of stage %s ended %s: submitting attempt %d", sid, stage, status, attempt + 1)
            record.setdefault("attempts", []).append({"attempt": attempt, "submission_id": sid, "status": status})
            attempt += 1
        else:
            log.warning("Ray job %s of stage %s is unknown to the cluster (restarted?): submitting it again", sid, stage)
    record = {**(record or {}), "run_id": ctx.run_id, "stage": stage, "attempt": attempt,
              "submission_id": submission_id(ctx.run_id, stage, attempt), "status": "SUBMITTING",
              "dashboard_url": dashboard_url(ctx.config), "entrypoint": job_entrypoint(ctx, stage, cli_args)}
    _write_record(ctx, record)  # first: a caller killed now finds the id, and submits it once
    sid = record["submission_id"]
    try:
        client.submit_job(entrypoint=record["entrypoint"], submission_id=sid,
                          runtime_env={"env_vars": job_env(ctx, config_path)},
                          metadata={"asr_retune_run_id": ctx.run_id, "asr_retune_stage": stage,
                                    "asr_retune_attempt": str(attempt)})
        log.info("submitted stage %s as Ray job %s (attempt %d): %s", stage, sid, attempt, record["entrypoint"])
    except RuntimeError as exc:
        if "already exists" not in str(exc):
            raise JobError(f"could not submit stage {stage} as Ray job {sid}: {exc}") from exc
        log.info("Ray job %s of stage %s was already submitted: attaching", sid, stage)
    record["status"] = "SUBMITTED"
    _write_record(ctx, record)
    return sid


def _status(client, sid: str) -> str | None:
    """The job's status, or None when the cluster does not know it."""
    try:
        return str(client.get_job_info(sid).status)
    except RuntimeError as exc:
        if "does not exist" in str(exc):
            return None
        raise JobError(f"cannot read the status of Ray job {sid}: {exc}") from exc


def _follow(client, sid: str, echo: Callable[[str], None], poll_s: float):
    """Stream the job's log to ``echo`` until it ends; returns (final status, JobDetails)."""
    lines = 0
    try:
        lines = _tail(client, sid, echo)
    except Exception as exc:  # noqa: BLE001 - the log stream broke: keep waiting on the status
        log.warning("log stream of Ray job %s broke (%s): waiting on its status", sid, exc)
    info = _wait_terminal(client, sid, poll_s)
    try:
        rest = client.get_job_logs(sid).splitlines()[lines:]
    except Exception:  # noqa: BLE001 - the logs are a courtesy here; the status decides
        rest = []
    for line in rest:
        echo(line)
    return str(info.status), info


def _tail(client, sid: str, echo: Callable[[str], None]) -> int:
    """Follow ``tail_job_logs`` (async) until the job's log closes; returns the lines echoed."""
    count = 0

    async def follow() -> None:
        nonlocal count
        pending = ""
        async for chunk in client.tail_job_logs(sid):
            pending += chunk
            *done, pending = pending.split("\n")
            for line in done:
                echo(line)
                count += 1
        if pending:
            echo(pending)
            count += 1

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(follow())
    else:  # called from inside an event loop: follow on a thread of its own
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, follow()).result()
    return count


def _wait_terminal(client, sid: str, poll_s: float):
    """Poll the job until it is terminal; a Jobs API unreachable for ``UNREACHABLE_S`` is a :class:`JobError`."""
    unreachable_since = None
    while True:
        try:
            info = client.get_job_info(sid)
            unreachable_since = None
            if info.status.is_terminal():
                return info
        except Exception as exc:  # noqa: BLE001 - connection errors of requests, or the API's 5xx
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > UNREACHABLE_S:
                raise JobError(f"lost the Ray Jobs API for {UNREACHABLE_S:.0f} s while following job {sid} ({exc}); "
                               "the job may still run: a retry re-attaches to it") from exc
        time.sleep(poll_s)
