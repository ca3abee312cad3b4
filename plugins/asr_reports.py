"""Airflow 3 plugin: on-call engineers browse the gating reports of ``asr_weekly_retune``.

Mounts the FastAPI app of :mod:`pipeline.airflow.report_browser` under ``/asr-reports`` of the
Airflow API server and adds a *Browse* menu entry ("ASR gating reports") that shows it
inside the Airflow UI. The app lists the runs in the configured object store with their
gate decision and serves each run's HTML report; it reads the store named by the pipeline
configuration (``ASR_RETUNE_CONFIG`` / ``ASR_RETUNE__STORAGE__ROOT`` in the API server's
environment) and shows no configuration beyond the store's root.

Access: every route but ``/asr-reports/healthz`` needs an Airflow login (the UI's session
cookie or an ``Authorization: Bearer <JWT>`` header) with read access to the runs of
``asr_weekly_retune``; plugin apps are not protected by Airflow on their own.

Importing this module is cheap (FastAPI, Jinja2 and the pipeline's core modules only): Airflow
loads plugins in every component, not just the API server.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipeline.airflow.report_browser import create_app

DAG_ID = "asr_weekly_retune"
URL_PREFIX = "/asr-reports"

_bearer = HTTPBearer(auto_error=False)


async def require_dag_run_reader(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """An Airflow user who may read the runs of ``asr_weekly_retune`` (401/403 otherwise)."""
    # Airflow's API-server modules are imported here, on the first request, not at plugin load.
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.api_fastapi.core_api.security import get_user

    user = await get_user(request, None, bearer)
    allowed = get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=DAG_ID), user=user
    )
    if not allowed:
        raise HTTPException(status_code=403, detail=f"not allowed to read the runs of {DAG_ID}")


app = create_app(dependencies=[Depends(require_dag_run_reader)])


class AsrReportsPlugin(AirflowPlugin):
    name = "asr_reports"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "ASR gating reports"}]
    external_views = [
        {
            "name": "ASR gating reports",
            # relative to the UI's base URL (no leading slash), so it works behind a proxy
            "href": URL_PREFIX.lstrip("/") + "/",
            "destination": "nav",
            "category": "browse",
            "url_route": "asr-reports",
        }
    ]
