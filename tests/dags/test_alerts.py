"""The DAG's failure callback: one clear line, hooks from the environment, never the network
(the webhook is a fake sender or a server on 127.0.0.1) and never the webhook's URL in a log."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from pipeline.airflow import alerts

SECRET_URL = "https://hooks.slack.example/services/T000/B000/very-secret-token"


def _ti(**overrides):
    values = dict(dag_id="asr_weekly_retune", run_id="manual__2026-11-28T10:00:00+00:00", task_id="train",
                  try_number=3, max_tries=2,
                  log_url="http://airflow.local/dags/asr_weekly_retune/runs/x/tasks/train?try_number=3")
    values.update(overrides)
    return SimpleNamespace(**values)


def _context(**overrides):
    ti = _ti()
    ctx = {"ti": ti, "task_instance": ti, "run_id": ti.run_id,
           "exception": RuntimeError("full training failed: worker 1 lost\n  (node preempted)")}
    ctx.update(overrides)
    return ctx


@pytest.fixture(autouse=True)
def no_hooks(monkeypatch):
    for name in (alerts.ENV_WEBHOOK, alerts.ENV_HOOK, alerts.ENV_FILE, alerts.ENV_ON_RETRY):
        monkeypatch.delenv(name, raising=False)


def test_alert_line_names_everything_on_call_needs():
    alert = alerts.alert_from_context(_context(), "failed")
    line = alert.line()
    assert line.startswith("ASR-RETUNE ALERT [FAILED] dag=asr_weekly_retune run=manual__2026-11-28T10:00:00+00:00")
    assert "task=train try=3/3" in line
    assert "error: RuntimeError: full training failed: worker 1 lost (node preempted)" in line  # one line
    assert "partition: runs/manual__2026-11-28T10:00:00+00:00/train/" in line
    assert "log: http://airflow.local/" in line and "runbook:" in line
    assert "\n" not in line


def test_long_errors_are_cut():
    alert = alerts.alert_from_context(_context(exception=ValueError("x" * 5000)), "failed")
    assert len(alert.error) <= alerts.MAX_ERROR_CHARS


def test_failure_is_logged_without_hooks(caplog):
    sent = []
    with caplog.at_level(logging.INFO, logger="asr_retune.alerts"):
        line = alerts.emit(alerts.alert_from_context(_context(), "failed"), environ={},
                           post=lambda url, payload: sent.append(url) or 200)
    assert sent == []
    assert [r.levelno for r in caplog.records] == [logging.ERROR] and caplog.records[0].getMessage() == line


def test_failure_goes_to_the_webhook_and_the_url_stays_secret(caplog):
    sent = []
    env = {alerts.ENV_WEBHOOK: SECRET_URL}
    with caplog.at_level(logging.INFO, logger="asr_retune.alerts"):
        alerts.emit(alerts.alert_from_context(_context(), "failed"), environ=env,
                    post=lambda url, payload: sent.append((url, payload)) or 200)
        alerts.emit(alerts.alert_from_context(_context(), "failed"), environ=env,
                    post=lambda url, payload: (_ for _ in ()).throw(ConnectionError(url)))
        alerts.emit(alerts.alert_from_context(_context(), "failed"), environ=env, post=lambda url, payload: 500)
    (url, payload), = sent
    assert url == SECRET_URL and payload["text"].startswith("ASR-RETUNE ALERT [FAILED]")
    assert payload["alert"]["task_id"] == "train"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "webhook (host hooks.slack.example) failed: ConnectionError" in messages
    assert "answered HTTP 500" in messages
    assert "very-secret-token" not in messages


def test_a_non_http_webhook_is_refused(caplog):
    sent = []
    with caplog.at_level(logging.INFO, logger="asr_retune.alerts"):
        alerts.emit(alerts.alert_from_context(_context(), "failed"), environ={alerts.ENV_WEBHOOK: "file:///etc/passwd"},
                    post=lambda url, payload: sent.append(url) or 200)
    assert sent == [] and "not an http(s) URL" in caplog.text


def test_retries_warn_but_page_only_when_asked(caplog):
    sent = []
    post = lambda url, payload: sent.append(payload) or 200  # noqa: E731
    with caplog.at_level(logging.INFO, logger="asr_retune.alerts"):
        alerts.emit(alerts.alert_from_context(_context(), "retry"), environ={alerts.ENV_WEBHOOK: SECRET_URL}, post=post)
        assert sent == [] and caplog.records[-1].levelno == logging.WARNING
        alerts.emit(alerts.alert_from_context(_context(), "retry"),
                    environ={alerts.ENV_WEBHOOK: SECRET_URL, alerts.ENV_ON_RETRY: "1"}, post=post)
    assert len(sent) == 1 and sent[0]["alert"]["kind"] == "retry"


def test_python_hook_and_file(tmp_path, monkeypatch):
    (tmp_path / "pager_hook.py").write_text(
        "received = []\n"
        "def page(alert):\n    received.append(alert)\n"
        "def broken(alert):\n    raise RuntimeError('pager down')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import pager_hook

    file = tmp_path / "alerts.jsonl"
    env = {alerts.ENV_HOOK: "pager_hook:page", alerts.ENV_FILE: str(file)}
    alerts.emit(alerts.alert_from_context(_context(), "failed"), environ=env)
    alerts.emit(alerts.alert_from_context(_context(), "retry"), environ=env)
    assert [a.kind for a in pager_hook.received] == ["failed"]  # retries are not paged by default
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["failed", "retry"] and rows[0]["line"].startswith("ASR-RETUNE ALERT")
    # a broken hook is logged, never raised
    alerts.emit(alerts.alert_from_context(_context(), "failed"), environ={alerts.ENV_HOOK: "pager_hook:broken"})


def test_airflow_callbacks_read_the_environment(tmp_path, monkeypatch):
    file = tmp_path / "alerts.jsonl"
    monkeypatch.setenv(alerts.ENV_FILE, str(file))
    alerts.on_failure(_context())
    alerts.on_retry(_context())
    dag_run = SimpleNamespace(dag_id="asr_weekly_retune", run_id="scheduled__2026-11-30T03:00:00+00:00")
    alerts.on_run_failure({"dag_run": dag_run, "reason": "timed_out"})
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["failed", "retry", "run-failed"]
    run_failed = rows[-1]
    assert run_failed["task_id"] is None and run_failed["error"] == "timed_out"
    assert "dag run" in run_failed["line"] and "run=scheduled__2026-11-30T03:00:00+00:00" in run_failed["line"]


def test_webhook_transport_posts_json_to_a_local_server():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.headers["Content-Type"], json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        alerts.emit(alerts.alert_from_context(_context(), "failed"), environ={alerts.ENV_WEBHOOK: url})
    finally:
        server.shutdown()
    (ctype, payload), = received
    assert ctype == "application/json" and payload["text"].startswith("ASR-RETUNE ALERT [FAILED]")
