"""Airflow 3 plugin: a trigger of ``asr_weekly_retune`` through the REST API (and the UI, which
uses it) is refused when its ``conf`` holds a key the DAG does not declare as a parameter.

Airflow validates the *values* of declared params when a run is created (``epochs: -1`` is a
400 naming ``epochs``), but it accepts any other key and passes it on unread, so a typo
(``epoch: 3``) would run the week with the configured epochs. This plugin adds a root
middleware to the API server that reads the body of ``POST /api/v2/dags/<dag>/dagRuns`` and
answers 400, before any run exists, naming the unknown key, the closest declared one and the
declared ones. The declared params are those of the DAG's latest serialized version in the
metadata DB (what the trigger itself validates against).

Only callers who may trigger the DAG get that answer: an unauthenticated or unauthorized
request, a body that is not a JSON object, a DAG that is not in the DB go on to Airflow,
which answers them as usual (401, 403, 422, 404). ``airflow dags trigger`` and
``airflow dags test`` write to the metadata DB directly and do not pass through here: the
DAG's first task refuses their unknown keys with the same message (``pipeline.airflow.conf``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from pipeline.airflow.conf import unknown_keys_message

DAG_IDS = ("asr_weekly_retune",)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _trigger_dag_id(scope: Scope, dag_ids: frozenset[str]) -> str | None:
    """The guarded DAG a request triggers (``POST …/api/v2/dags/<dag>/dagRuns``), else None."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    parts = scope["path"].rstrip("/").split("/")
    if len(parts) >= 5 and parts[-5:-3] == ["api", "v2"] and parts[-3] == "dags" and parts[-1] == "dagRuns":
        return parts[-2] if parts[-2] in dag_ids else None
    return None


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client is still connected."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the body already read to the app, then the client's next messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _may_trigger(scope: Scope, dag_id: str) -> bool:
    """Whether the request's credentials (bearer token or UI cookie) may create runs of ``dag_id``."""
    # Airflow's API-server modules are imported on the first guarded request, not at plugin load.
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi import HTTPException, Request
    from fastapi.security import HTTPAuthorizationCredentials

    request = Request(scope)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip()) if token.strip() else None
    try:
        user = await get_user(request, None, bearer)
    except HTTPException:
        return False
    return get_auth_manager().is_authorized_dag(
        method="POST", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user)


def _declared_params(dag_id: str) -> list[str] | None:
    """The params of the latest serialized version of ``dag_id`` (None: not in the metadata DB)."""
    from airflow.models.serialized_dag import SerializedDagModel

    dag = SerializedDagModel.get_dag(dag_id)
    return None if dag is None else list(dag.params)


class ConfGuard:
    """ASGI middleware: refuses (400) a trigger of a guarded DAG whose ``conf`` has unknown keys."""

    def __init__(self, app: Callable, dag_ids: Iterable[str] = DAG_IDS):
        self.app = app
        self.dag_ids = frozenset(dag_ids)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        dag_id = _trigger_dag_id(scope, self.dag_ids)
        if dag_id is None:
            return await self.app(scope, receive, send)
        body, connected = await _read_body(receive)
        replayed = _replay(body, receive)
        refusal = await self._refusal(scope, dag_id, body) if connected else None
        if refusal is None:
            return await self.app(scope, replayed, send)
        from fastapi.responses import JSONResponse

        await JSONResponse({"detail": refusal}, status_code=400)(scope, replayed, send)

    async def _refusal(self, scope: Scope, dag_id: str, body: bytes) -> str | None:
        from fastapi.concurrency import run_in_threadpool

        try:
            conf = json.loads(body).get("conf")
        except (ValueError, AttributeError):
            return None  # not a JSON object: Airflow's own validation answers
        if not isinstance(conf, dict) or not conf or not await _may_trigger(scope, dag_id):
            return None
        known = await run_in_threadpool(_declared_params, dag_id)
        return None if known is None else unknown_keys_message(dag_id, conf, known)


class AsrConfGuardPlugin(AirflowPlugin):
    name = "asr_conf_guard"
    fastapi_root_middlewares = [
        {"middleware": ConfGuard, "kwargs": {"dag_ids": DAG_IDS}, "name": "asr_weekly_retune conf guard"},
    ]
