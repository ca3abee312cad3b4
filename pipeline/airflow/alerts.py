"""Alerts for the Airflow DAG: one clear log line per failure, plus hook points for paging.

Airflow calls :func:`on_failure` (a task failed for good), :func:`on_retry` (a task failed
and will be retried) and :func:`on_run_failure` (the DAG run failed) with its context. Each builds an
:class:`Alert`, writes it as one line to the ``asr_retune.alerts`` logger (so it lands in
the task log, ERROR for a failure, WARNING for a retry) and then hands it to the hooks
configured through the environment (names only here; the values are secrets and are never
logged or stored):

``ASR_RETUNE_ALERT_WEBHOOK_URL``
    An ``https://`` (or ``http://``) URL that receives ``POST`` JSON ``{"text": line,
    "alert": {...}}``: a Slack incoming webhook accepts it as is; for anything else point it
    at a relay. Sent for failures; for retries too when ``ASR_RETUNE_ALERT_ON_RETRY=1``.
``ASR_RETUNE_ALERT_HOOK``
    ``package.module:function`` called with the :class:`Alert` (e.g. a PagerDuty Events v2
    client that reads its routing key from its own secret). Same rule for retries.
``ASR_RETUNE_ALERT_FILE``
    A local file that gets every alert appended as one JSON line (retries included); used by
    the tests and handy on a single machine.

A hook that fails is logged (without the URL) and never raises: an alert must not turn a
clean failure report into a callback crash. Only the standard library is imported here,
because the DAG file imports this module at parse time.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "ENV_FILE",
    "ENV_HOOK",
    "ENV_ON_RETRY",
    "ENV_WEBHOOK",
    "Alert",
    "alert_from_context",
    "emit",
    "on_failure",
    "on_retry",
    "on_run_failure",
]

log = logging.getLogger("asr_retune.alerts")

ENV_WEBHOOK = "ASR_RETUNE_ALERT_WEBHOOK_URL"
ENV_HOOK = "ASR_RETUNE_ALERT_HOOK"
ENV_FILE = "ASR_RETUNE_ALERT_FILE"
ENV_ON_RETRY = "ASR_RETUNE_ALERT_ON_RETRY"

WEBHOOK_TIMEOUT_S = 5.0
MAX_ERROR_CHARS = 500
RUNBOOK = "README.md, section 'On call'"


@dataclass
class Alert:
    """What went wrong, where, and where to look; JSON-serialisable."""

    kind: str  # "failed" (a task failed for good), "retry" (it will be retried) or "run-failed"
    dag_id: str
    run_id: str
    task_id: str | None = None
    try_number: int | None = None
    max_tries: int | None = None
    error: str | None = None
    log_url: str | None = None
    partition: str | None = None
    at: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    def line(self) -> str:
        """The one line on-call reads first."""
        where = f"task={self.task_id}" if self.task_id else "dag run"
        tries = ""
        if self.try_number is not None:
            tries = f" try={self.try_number}/{(self.max_tries or 0) + 1}"
        parts = [f"ASR-RETUNE ALERT [{self.kind.upper()}] dag={self.dag_id} run={self.run_id} {where}{tries}"]
        if self.error:
            parts.append(f"error: {self.error}")
        if self.partition:
            parts.append(f"partition: {self.partition}")
        if self.log_url:
            parts.append(f"log: {self.log_url}")
        parts.append(f"runbook: {RUNBOOK}")
        return " | ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short_error(exc: Any) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, BaseException):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = str(exc)
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - a lazy property that cannot be resolved here
        return None


def alert_from_context(context: Mapping[str, Any], kind: str) -> Alert:
    """Build an :class:`Alert` from an Airflow callback context (task- or DAG-level)."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    dag_id = _get(ti, "dag_id") or _get(dag_run, "dag_id") or _get(dag, "dag_id") or "?"
    run_id = context.get("run_id") or _get(ti, "run_id") or _get(dag_run, "run_id") or "?"
    task_id = _get(ti, "task_id")
    error = context.get("exception") or context.get("reason")
    partition = f"runs/{run_id}/{task_id}/" if task_id else None
    try_number = _get(ti, "try_number")
    max_tries = _get(ti, "max_tries")
    return Alert(
        kind=kind,
        dag_id=str(dag_id),
        run_id=str(run_id),
        task_id=str(task_id) if task_id else None,
        try_number=int(try_number) if isinstance(try_number, int) else None,
        max_tries=int(max_tries) if isinstance(max_tries, int) else None,
        error=_short_error(error),
        log_url=_get(ti, "log_url") if task_id else None,
        partition=partition,
    )


def _post_json(url: str, payload: dict[str, Any], timeout: float = WEBHOOK_TIMEOUT_S) -> int:
    """POST ``payload`` as JSON; returns the HTTP status (raises on transport errors)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - scheme checked by caller
        return int(response.status)


def _send_webhook(alert: Alert, url: str, post: Callable[[str, dict[str, Any]], int]) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("https", "http") or not parsed.netloc:
        log.error("%s is set but is not an http(s) URL; alert not sent to the webhook", ENV_WEBHOOK)
        return
    host = parsed.hostname or "?"
    try:
        status = post(url, {"text": alert.line(), "alert": alert.to_dict()})
    except Exception as exc:  # noqa: BLE001 - never let paging break the callback
        log.error("alert webhook (host %s) failed: %s", host, type(exc).__name__)
        return
    if not 200 <= status < 300:
        log.error("alert webhook (host %s) answered HTTP %s", host, status)


def _call_hook(alert: Alert, spec: str) -> None:
    module_name, _, func_name = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        func(alert)
    except Exception as exc:  # noqa: BLE001
        log.error("alert hook %s failed: %s: %s", spec, type(exc).__name__, exc)


def _append_file(alert: Alert, path: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**alert.to_dict(), "line": alert.line()}, sort_keys=True) + "\n")
    except OSError as exc:
        log.error("could not append the alert to %s: %s", path, exc)


def emit(
    alert: Alert,
    environ: Mapping[str, str] | None = None,
    post: Callable[[str, dict[str, Any]], int] = _post_json,
) -> str:
    """Log ``alert`` as one line, then fan it out to the configured hooks; returns the line."""
    env = os.environ if environ is None else environ
    line = alert.line()
    log.log(logging.WARNING if alert.kind == "retry" else logging.ERROR, line)
    if env.get(ENV_FILE):
        _append_file(alert, env[ENV_FILE])
    page = alert.kind != "retry" or env.get(ENV_ON_RETRY, "").strip().lower() in ("1", "true", "yes")
    if page and env.get(ENV_WEBHOOK):
        _send_webhook(alert, env[ENV_WEBHOOK], post)
    if page and env.get(ENV_HOOK):
        _call_hook(alert, env[ENV_HOOK])
    return line


def on_failure(context: Mapping[str, Any]) -> None:
    """Airflow ``on_failure_callback`` (task or DAG level)."""
    emit(alert_from_context(context, "failed"))


def on_run_failure(context: Mapping[str, Any]) -> None:
    """Airflow DAG-level ``on_failure_callback``: the run failed (a task failed for good, or a timeout)."""
    alert = alert_from_context(context, "run-failed")
    alert.task_id = alert.try_number = alert.max_tries = alert.log_url = alert.partition = None
    emit(alert)


def on_retry(context: Mapping[str, Any]) -> None:
    """Airflow ``on_retry_callback``: a warning line; paged only if ``ASR_RETUNE_ALERT_ON_RETRY=1``."""
    emit(alert_from_context(context, "retry"))
