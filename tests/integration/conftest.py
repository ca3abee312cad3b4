"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest
from support.mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def mlflow_started(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1, started (not yet waited for: ``wait_ready()``), one per module."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()
