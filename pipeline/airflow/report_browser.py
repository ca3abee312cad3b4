"""Browse gating reports: the runs in the store with their gate decision, and each report.

On-call engineers open this from the Airflow UI (the plugin ``plugins/asr_reports.py``
mounts :func:`create_app` under ``/asr-reports``). It reads only the configured object
store (``storage.root``): for every ``runs/{run_id}/`` it shows the gate decision when
``gate/decision.json`` exists, else which stages completed (their ``_SUCCESS`` markers),
and serves ``gate/report.html``. Nothing from the configuration is shown except the store's
root with any user/password part removed; endpoints and credentials never appear.

Routes (relative to the mount point):

``GET /``                          HTML list, newest run first (``?limit=``, default 50)
``GET /api/runs``                  the same as JSON
``GET /runs/{run_id}/report``      the run's ``gate/report.html`` (404 with a message if absent)
``GET /runs/{run_id}/decision.json`` the run's gate decision (404 if absent)
``GET /healthz``                   ``ok``
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pipeline.config import ConfigError
from pipeline.storage import LocalStore, ObjectStore, S3Store, StorageError, join

log = logging.getLogger(__name__)

__all__ = ["RunEntry", "create_app", "describe_run", "list_run_ids", "list_runs", "render_list", "safe_root"]

RUNS = "runs"
SUCCESS = "_SUCCESS"
GATE_DECISION = "gate/decision.json"
GATE_REPORT = "gate/report.html"
# The weekly order; stages not listed here are shown after these, by name.
STAGE_ORDER = ("ingest", "features", "proxy", "search", "train", "gate", "register", "canary", "deploy", "promote")
MAX_LIMIT = 500

CSP_LIST = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'"
# The gate's report is our own HTML, with transcripts in it: no scripts, no remote loads.
CSP_REPORT = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; frame-ancestors 'self'"

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+\-]{0,199}$")
_ISO = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})")
_COMPACT = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z")


@dataclass
class RunEntry:
    """One run as the list shows it."""

    run_id: str
    stages_done: list[str] = field(default_factory=list)
    stages_incomplete: list[str] = field(default_factory=list)
    has_report: bool = False
    decision: dict[str, Any] | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def safe_root(store: ObjectStore) -> str:
    """The store's root for display: scheme, host/bucket and path only (no user, password or query)."""
    root = str(store.root)
    if "://" not in root:
        return root
    parts = urlsplit(root)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _child_dirs(store: ObjectStore, prefix: str) -> list[str]:
    """Immediate sub-folders of ``prefix`` without listing everything below them."""
    prefix = prefix.strip("/")
    if isinstance(store, LocalStore):
        path = store.base / prefix
        if not path.is_dir():
            return []
        return sorted(e.name for e in os.scandir(path) if e.is_dir())
    if isinstance(store, S3Store):
        full = join(store.prefix, prefix) + "/"
        out: list[str] = []
        try:
            paginator = store.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=store.bucket, Prefix=full, Delimiter="/"):
                out.extend(cp["Prefix"][len(full):].rstrip("/") for cp in page.get("CommonPrefixes", []))
        except Exception as exc:  # noqa: BLE001 - named, never with credentials
            raise StorageError(f"list {store.uri(prefix)}/ failed: {type(exc).__name__}") from None
        return sorted(out)
    return store.list_dirs(prefix)


def _sort_key(run_id: str, decision: dict[str, Any] | None) -> str:
    m = _ISO.search(run_id)
    if m:
        return f"{m.group(1)}T{m.group(2)}"
    m = _COMPACT.search(run_id)
    if m:
        y, mo, d, h, mi, s = m.groups()
        return f"{y}-{mo}-{d}T{h}:{mi}:{s}"
    if decision and isinstance(decision.get("decided_at"), str):
        return decision["decided_at"][:19]
    return ""


def list_run_ids(store: ObjectStore) -> list[str]:
    """Every folder under ``runs/`` that is a valid run id."""
    return [r for r in _child_dirs(store, RUNS) if _RUN_ID.match(r)]


def _stage_rank(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), stage)


def _brief_decision(raw: dict[str, Any]) -> dict[str, Any]:
    """What the list shows of a decision (no thresholds, no URIs)."""
    cand = raw.get("candidate") or {}
    prod = raw.get("production") or {}
    boot = raw.get("bootstrap") or {}
    return {
        "passed": bool(raw.get("passed")),
        "forced": bool(raw.get("forced")),
        "force_reason": raw.get("force_reason"),
        "cold_start": bool(raw.get("cold_start")),
        "failing_rules": [str(r) for r in raw.get("failing_rules") or []],
        "candidate_wer": cand.get("wer"),
        "production_wer": prod.get("wer") if prod else None,
        "production_version": prod.get("version") if prod else None,
        "delta_wer_ci": [boot.get("ci_low"), boot.get("ci_high")] if boot else None,
        "decided_at": raw.get("decided_at"),
    }


def describe_run(store: ObjectStore, run_id: str) -> RunEntry:
    """Stages, decision and report of one run, from one listing of its folder."""
    entry = RunEntry(run_id=run_id)
    prefix = join(RUNS, run_id) + "/"
    keys = [k[len(prefix):] for k in store.list(prefix)]
    stages: dict[str, bool] = {}
    for key in keys:
        stage, _, rest = key.partition("/")
        if not rest or stage.startswith("_"):
            continue  # a file at the run's top, or a work area (e.g. _work/ of Ray)
        stages[stage] = stages.get(stage, False) or rest == SUCCESS
    entry.stages_done = sorted((s for s, done in stages.items() if done), key=_stage_rank)
    entry.stages_incomplete = sorted((s for s, done in stages.items() if not done), key=_stage_rank)
    entry.has_report = GATE_REPORT in keys
    if GATE_DECISION in keys:
        try:
            entry.decision = _brief_decision(json.loads(store.get_text(join(prefix, GATE_DECISION))))
        except (ValueError, StorageError, AttributeError, TypeError) as exc:
            entry.note = f"gate/decision.json is unreadable ({type(exc).__name__})"
    return entry


def list_runs(store: ObjectStore, limit: int = 50) -> tuple[list[RunEntry], int]:
    """The newest ``limit`` runs (by the time in their id) and the total number of runs."""
    ids = list_run_ids(store)
    ids.sort(key=lambda r: (_sort_key(r, None), r), reverse=True)
    return [describe_run(store, r) for r in ids[:limit]], len(ids)


# --------------------------------------------------------------------------- HTML

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px}
p.sub{color:#59636e;margin:0 0 16px;font-size:13px}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{border-bottom:1px solid #d1d9e0;padding:8px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
tr:hover td{background:#f6f8fa}
code{font-size:12px}
td.run code{white-space:nowrap}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600;font-size:12px}
.pass{background:#dafbe1;color:#116329}.fail{background:#ffebe9;color:#a40e26}
.forced{background:#fff8c5;color:#7d4e00}.none{background:#eef1f4;color:#59636e}
.stage{display:inline-block;margin:1px 3px 1px 0;padding:1px 6px;border-radius:4px;font-size:12px}
.done{background:#dafbe1;color:#116329}.incomplete{background:#ffebe9;color:#a40e26}
.muted{color:#59636e}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _pct(x: Any) -> str:
    return f"{100 * float(x):.2f} %" if isinstance(x, (int, float)) else "–"


def _decision_cell(entry: RunEntry) -> str:
    d = entry.decision
    if d is None:
        text = entry.note or "no gate decision yet"
        return f'<span class="badge none">{_e(text)}</span>'
    if d["forced"]:
        badge = f'<span class="badge forced">PASS (forced)</span><div class="muted">{_e(d.get("force_reason"))}</div>'
    elif d["passed"]:
        badge = '<span class="badge pass">PASS</span>'
    else:
        badge = '<span class="badge fail">FAIL</span>'
    if d["cold_start"]:
        badge += '<div class="muted">cold start (no production model)</div>'
    return badge


def _stages_cell(entry: RunEntry) -> str:
    chips = [f'<span class="stage done" title="completed">{_e(s)} ✓</span>' for s in entry.stages_done]
    chips += [f'<span class="stage incomplete" title="started, not completed">{_e(s)} ✗</span>'
              for s in entry.stages_incomplete]
    return "".join(chips) or '<span class="muted">nothing yet</span>'


def render_list(entries: Sequence[RunEntry], total: int, root: str) -> str:
    """The server-rendered list page; every value is escaped, links are relative."""
    rows = []
    for entry in entries:
        d = entry.decision or {}
        link = f"runs/{quote(entry.run_id, safe='')}/report"
        report = f'<a href="{_e(link)}">report</a>' if entry.has_report else '<span class="muted">–</span>'
        prod = _pct(d.get("production_wer"))
        if d.get("production_version") is not None:
            prod += f' <span class="muted">(v{_e(d["production_version"])})</span>'
        ci = d.get("delta_wer_ci")
        delta = "–"
        if ci and all(isinstance(v, (int, float)) for v in ci):
            delta = f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] pts"
        failing = ", ".join(d.get("failing_rules") or []) or "–"
        rows.append(
            "<tr>"
            f'<td class="run"><code>{_e(entry.run_id)}</code></td>'
            f"<td>{_decision_cell(entry)}</td>"
            f"<td>{_pct(d.get('candidate_wer'))}</td>"
            f"<td>{prod}</td>"
            f"<td>{_e(delta)}</td>"
            f"<td>{_e(failing)}</td>"
            f"<td>{_stages_cell(entry)}</td>"
            f"<td>{report}</td>"
            "</tr>"
        )
    body = "".join(rows) or '<tr><td colspan="8" class="muted">No runs in this store yet.</td></tr>'
    shown = f"showing {len(entries)} of {total} run(s), newest first" if total else "no runs yet"
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>ASR gating reports</title>"
        f"<style>{_STYLE}</style></head><body>"
        "<h1>ASR gating reports</h1>"
        f'<p class="sub">asr_weekly_retune · store <code>{_e(root)}</code> · {_e(shown)}</p>'
        "<table><thead><tr><th>Run</th><th>Gate decision</th><th>Candidate WER</th><th>Production WER</th>"
        "<th>ΔWER CI</th><th>Failing rules</th><th>Stages</th><th>Report</th></tr></thead>"
        f"<tbody>{body}</tbody></table></body></html>"
    )


def _message_page(title: str, message: str) -> str:
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1><p>{_e(message)}</p><p><a href=\"../../\">all runs</a></p></body></html>"
    )


# --------------------------------------------------------------------------- the app


def _default_store() -> ObjectStore:
    from pipeline.config import load_config
    from pipeline.storage import open_store

    return open_store(None, load_config().storage)


def create_app(
    store_factory: Callable[[], ObjectStore] | None = None,
    dependencies: Sequence[Any] = (),
):
    """The FastAPI app; ``store_factory`` defaults to the configured store (opened once, lazily);
    ``dependencies`` (e.g. an authentication check) apply to every route but ``/healthz``."""
    from fastapi import APIRouter, FastAPI, HTTPException, Query
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    opened: list[ObjectStore] = []

    def store() -> ObjectStore:
        if not opened:
            opened.append((store_factory or _default_store)())
        return opened[0]

    def html_response(text: str, status: int = 200, csp: str = CSP_LIST) -> HTMLResponse:
        return HTMLResponse(text, status_code=status, headers={
            "Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
        })

    def checked(run_id: str) -> str:
        if not _RUN_ID.match(run_id):
            raise HTTPException(status_code=400, detail="invalid run id: letters, digits and _.:+- only")
        return run_id

    app = FastAPI(title="ASR gating reports", docs_url=None, redoc_url=None, openapi_url=None)
    router = APIRouter(dependencies=list(dependencies))

    @app.exception_handler(StorageError)
    async def storage_failed(_request, exc: StorageError):
        return PlainTextResponse(f"the object store could not be read: {exc}", status_code=503)

    @app.exception_handler(ConfigError)
    async def config_invalid(_request, exc: ConfigError):
        log.error("report browser: %s", exc)  # the details (field and value) go to the server's log only
        return PlainTextResponse("the pipeline configuration is invalid; see the API server's log", status_code=503)

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @router.get("/", response_class=HTMLResponse)
    def index(limit: int = Query(50, ge=1, le=MAX_LIMIT)) -> HTMLResponse:
        s = store()
        entries, total = list_runs(s, limit)
        return html_response(render_list(entries, total, safe_root(s)))

    @router.get("/api/runs")
    def api_runs(limit: int = Query(50, ge=1, le=MAX_LIMIT)) -> JSONResponse:
        entries, total = list_runs(store(), limit)
        return JSONResponse({"total": total, "runs": [e.to_dict() for e in entries]})

    @router.get("/runs/{run_id}/report", response_class=HTMLResponse)
    def report(run_id: str) -> HTMLResponse:
        s = store()
        key = join(RUNS, checked(run_id), GATE_REPORT)
        if s.exists(key):
            return html_response(s.get_text(key), csp=CSP_REPORT)
        entry = describe_run(s, run_id)
        if not (entry.stages_done or entry.stages_incomplete):
            message = f"There is no run {run_id!r} in this store."
        else:
            done = ", ".join(entry.stages_done) or "none"
            message = (f"Run {run_id!r} has no gating report yet: its gate stage has not completed "
                       f"(stages completed: {done}).")
        return html_response(_message_page("No gating report", message), status=404)

    @router.get("/runs/{run_id}/decision.json")
    def decision(run_id: str) -> JSONResponse:
        s = store()
        key = join(RUNS, checked(run_id), GATE_DECISION)
        if not s.exists(key):
            raise HTTPException(status_code=404, detail=f"run {run_id!r} has no gate decision")
        return JSONResponse(json.loads(s.get_text(key)))

    app.include_router(router)
    return app
