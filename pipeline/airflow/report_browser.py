"""Browse gating reports: the runs in the store with their gate decision, and each report.

On-call engineers open this from the Airflow UI (the plugin ``plugins/asr_reports.py``
mounts :func:`create_app` under ``/asr-reports``). It reads only the configured object
store (``storage.root``): for every ``runs/{run_id}/`` it shows the gate decision when
``gate/decision.json`` exists, else which stages completed (their ``_SUCCESS`` markers),
and serves ``gate/report.html``. Nothing from the configuration is shown except the store's
root with any user/password part removed; endpoints and credentials never appear. The
pages are Jinja2 templates in ``templates/`` (``runs.html.j2``, ``message.html.j2``), which
escape every value.

Routes (relative to the mount point):

``GET /``                          HTML list, newest run first (``?limit=``, default 50)
``GET /api/runs``                  the same as JSON
``GET /runs/{run_id}/report``      the run's ``gate/report.html`` (404 with a message if absent)
``GET /runs/{run_id}/decision.json`` the run's gate decision (404 if absent)
``GET /healthz``                   ``ok``
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import jinja2

from pipeline.config import ConfigError
from pipeline.run import RUN_ID_RE, STAGES, SUCCESS
from pipeline.storage import LocalStore, ObjectStore, S3Store, StorageError, join

log = logging.getLogger(__name__)

__all__ = ["RunEntry", "create_app", "describe_run", "list_run_ids", "list_runs", "render_list", "safe_root"]

RUNS = "runs"
GATE_DECISION = "gate/decision.json"
GATE_REPORT = "gate/report.html"
MAX_LIMIT = 500

CSP_LIST = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'"
# The gate's report is our own HTML, with transcripts in it: no scripts, no remote loads.
CSP_REPORT = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; frame-ancestors 'self'"

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
    return [r for r in _child_dirs(store, RUNS) if RUN_ID_RE.match(r)]


def _stage_rank(stage: str) -> tuple[int, str]:
    """The weekly order (:data:`pipeline.run.STAGES`); other partitions (e.g. ``features-{hash}``) after, by name."""
    return (STAGES.index(stage) if stage in STAGES else len(STAGES), stage)


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


@functools.lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _row(entry: RunEntry) -> dict[str, Any]:
    """What the list shows of one run, as plain values (the template escapes them)."""
    # imported here: the plugin module stays cheap to import in every Airflow component
    from pipeline.asr.metrics import format_pct, format_points

    d = entry.decision or {}
    ci = d.get("delta_wer_ci")
    return {
        "run_id": entry.run_id,
        "decision": entry.decision,
        "note": entry.note,
        "candidate_wer": format_pct(d.get("candidate_wer")),
        "production_wer": format_pct(d.get("production_wer")),
        "production_version": d.get("production_version"),
        "delta_ci": f"[{format_points(ci[0])}, {format_points(ci[1])}]" if ci and None not in ci else "n/a",
        "failing": ", ".join(d.get("failing_rules") or []) or "–",
        "stages_done": entry.stages_done,
        "stages_incomplete": entry.stages_incomplete,
        "report_link": f"runs/{quote(entry.run_id, safe='')}/report" if entry.has_report else None,
    }


def render_list(entries: Sequence[RunEntry], total: int, root: str) -> str:
    """The server-rendered list page (``templates/runs.html.j2``); every value is escaped, links are relative."""
    shown = f"showing {len(entries)} of {total} run(s), newest first" if total else "no runs yet"
    return _templates().get_template("runs.html.j2").render(rows=[_row(e) for e in entries], root=root, shown=shown)


def _message_page(title: str, message: str) -> str:
    return _templates().get_template("message.html.j2").render(title=title, message=message)


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
        if not RUN_ID_RE.match(run_id):
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
