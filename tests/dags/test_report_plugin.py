"""The on-call plugin: Airflow registers it, its app lists the runs with their gate decision
and serves each report (FastAPI TestClient), it needs an Airflow login, shows no secrets,
and a headless Chromium renders the list."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from support.dag_env import (
    NEWEST_FIRST,
    PLUGINS_DIR,
    REPORT_RUNS,
    populate_reports,
    report_html,
)

from pipeline.airflow.report_browser import create_app, list_runs, safe_root
from pipeline.serving.ports import free_port

PASSED = "scheduled__2026-11-23T03:00:00+00:00"
FAILED = "scheduled__2026-11-30T03:00:00+00:00"
FORCED = "manual__2026-12-01T10:00:00+00:00"
NO_GATE = "manual__2026-12-02T09:30:00+00:00"
COLD = "cli__20261120T101500Z__ab12cd"


def _path(run_id: str, what: str = "report") -> str:
    return f"/runs/{quote(run_id, safe='')}/{what}"


@pytest.fixture
def client(report_store):
    return TestClient(create_app(store_factory=lambda: report_store))


def test_plugin_is_registered_with_an_app_and_a_menu_link():
    from airflow import plugins_manager

    assert not any("asr_reports" in k for k in plugins_manager.get_import_errors())
    apps, _ = plugins_manager.get_fastapi_plugins()
    (mine,) = [a for a in apps if a["name"] == "ASR gating reports"]
    assert mine["url_prefix"] == "/asr-reports"
    (info,) = [p for p in plugins_manager.get_plugin_info() if p["name"] == "asr_reports"]
    (view,) = info["external_views"]
    assert view["href"] == "asr-reports/" and view["url_route"] == "asr-reports" and view["destination"] == "nav"


def test_plugin_app_needs_an_airflow_login():
    sys.path.insert(0, str(PLUGINS_DIR))
    try:
        import asr_reports
    finally:
        sys.path.remove(str(PLUGINS_DIR))
    client = TestClient(asr_reports.app)
    assert client.get("/").status_code == 401
    assert client.get("/api/runs").status_code == 401
    assert client.get(_path(PASSED)).status_code == 401
    assert client.get("/healthz").text == "ok"


def test_list_shows_runs_newest_first_with_their_decision(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    positions = [page.index(f"<code>{rid}</code>") for rid in NEWEST_FIRST]
    assert positions == sorted(positions)
    assert page.count('<span class="badge pass">PASS</span>') == 2  # passed + cold start
    assert page.count('<span class="badge fail">FAIL</span>') == 1
    assert "PASS (forced)" in page and "cold start (no production model)" in page
    assert "delta_wer, worst_group" in page
    assert "4.10%" in page and "5.20%" in page and "(v3)" in page  # candidate and production WER (asr.metrics.format_pct)
    assert "no gate decision yet" in page
    assert '<span class="stage incomplete" title="started, not completed">train ✗</span>' in page
    assert "_work" not in page  # Ray's work area is not a stage
    assert "not a run id" not in page  # only valid run ids are runs
    assert f'href="runs/{quote(PASSED, safe="")}/report"' in page  # relative: works under /asr-reports/
    assert "showing 5 of 5 run(s)" in page


def test_list_escapes_what_it_shows(client):
    page = client.get("/").text
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; hotfix for INC-42" in page


def test_limit(client):
    page = client.get("/?limit=2").text
    assert "showing 2 of 5 run(s)" in page and NEWEST_FIRST[2] not in page
    assert client.get("/?limit=0").status_code == 422


def test_serves_a_report(client):
    r = client.get(_path(FAILED))
    assert r.status_code == 200 and r.text == report_html(FAILED)
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none' covers scripts
    assert r.headers["x-content-type-options"] == "nosniff"


def test_missing_report_is_a_404_that_says_why(client):
    r = client.get(_path(NO_GATE))
    assert r.status_code == 404
    assert "has no gating report yet" in r.text and "stages completed: ingest, features" in r.text
    r = client.get(_path("manual__2020-01-01T00:00:00+00:00"))
    assert r.status_code == 404 and "There is no run" in r.text


def test_bad_run_ids_are_refused(client):
    assert client.get("/runs/..%2F..%2Fetc/report").status_code in (400, 404)
    assert client.get("/runs/bad%20id/report").status_code == 400
    assert client.get("/runs/.hidden/report").status_code == 400


def test_json_endpoints(client):
    data = client.get("/api/runs").json()
    assert data["total"] == 5 and [r["run_id"] for r in data["runs"]] == NEWEST_FIRST
    by_id = {r["run_id"]: r for r in data["runs"]}
    assert by_id[FAILED]["decision"]["passed"] is False and by_id[FAILED]["has_report"] is True
    assert by_id[NO_GATE]["decision"] is None and by_id[NO_GATE]["stages_done"] == ["ingest", "features"]
    decision = client.get(_path(FORCED, "decision.json")).json()
    assert decision["forced"] is True and decision["run_id"] == FORCED
    assert client.get(_path(NO_GATE, "decision.json")).status_code == 404


def test_mounted_like_airflow_mounts_it(report_store):
    root = FastAPI()
    root.mount("/asr-reports", create_app(store_factory=lambda: report_store))
    client = TestClient(root)
    page = client.get("/asr-reports/").text
    assert PASSED in page
    link = f"runs/{quote(PASSED, safe='')}/report"
    assert client.get(f"/asr-reports/{link}").text == report_html(PASSED)
    assert client.get("/asr-reports", follow_redirects=True).status_code == 200


def test_unreadable_decision_is_named_not_hidden(report_store, client):
    report_store.put_text(f"runs/{PASSED}/gate/decision.json", "{not json")
    page = client.get("/").text
    assert "gate/decision.json is unreadable" in page


def test_store_and_config_failures_are_503_without_details():
    from pipeline.config import ConfigError
    from pipeline.storage import StorageError

    def bad_config():
        raise ConfigError("invalid configuration: storage.s3_endpoint_url: got 'https://user:hunter2@s3.local'")

    r = TestClient(create_app(store_factory=bad_config)).get("/")
    assert r.status_code == 503 and "hunter2" not in r.text and "configuration is invalid" in r.text

    class Broken:
        root = "s3://bucket/prefix"

        def list_dirs(self, prefix):
            raise StorageError("list s3://bucket/prefix/runs/ failed: AccessDenied (HTTP 403)")

    r = TestClient(create_app(store_factory=Broken)).get("/")
    assert r.status_code == 503 and "AccessDenied" in r.text


def test_shown_root_has_no_credentials():
    class FakeStore:
        root = "https://AKIAUSER:s3cr3t-pass@objects.example.com:9000/bucket/prefix?X-Amz-Signature=abc"

    shown = safe_root(FakeStore())
    assert shown == "https://objects.example.com:9000/bucket/prefix"


@pytest.mark.integration
def test_reads_an_s3_store_and_shows_no_secrets(moto_server, s3_bucket, aws_env):
    from pipeline.config import StorageConfig
    from pipeline.storage import open_store

    store = open_store(f"s3://{s3_bucket}/pipeline", StorageConfig(s3_endpoint_url=moto_server, retry_max_attempts=2))
    populate_reports(store)
    entries, total = list_runs(store)
    assert total == len(REPORT_RUNS) and [e.run_id for e in entries] == NEWEST_FIRST
    client = TestClient(create_app(store_factory=lambda: store))
    page = client.get("/").text
    assert f"s3://{s3_bucket}/pipeline" in page
    for secret in ("test-secret-do-not-log-0123456789", "AKIATESTSECRETKEYID01", moto_server):
        assert secret not in page
    assert client.get(_path(FAILED)).text == report_html(FAILED)


# --------------------------------------------------------------------------- screenshot

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"



def test_headless_chromium_renders_the_list(report_store, tmp_path):
    import uvicorn

    PIL = pytest.importorskip("PIL.Image")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (Debian: apt-get update && apt-get install -y chromium)")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store_factory=lambda: report_store),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    shot = tmp_path / "asr-reports.png"
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
             "--window-size=1400,700", f"--screenshot={shot}", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    print(f"screenshot: {shot}")
    image = PIL.open(shot).convert("RGB")
    assert image.size == (1400, 700)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the page rendered (nearly) blank"
    white = sum(n for n, rgb in colours if min(rgb) >= 250)
    assert white < 0.97 * image.size[0] * image.size[1], "the page rendered (nearly) blank"
    # the green and red decision badges are on the page
    assert any(rgb == (0xda, 0xfb, 0xe1) for _, rgb in colours)
    assert any(rgb == (0xff, 0xeb, 0xe9) for _, rgb in colours)
