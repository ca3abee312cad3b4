"""Fixtures of the DAG and plugin tests; the helpers (and Airflow's environment, pinned
before Airflow is imported) live in ``tests/support/dag_env.py``."""

from __future__ import annotations

import pytest
from support.dag_env import populate_reports


@pytest.fixture
def report_store(tmp_path):
    from pipeline.storage import LocalStore

    store = LocalStore(tmp_path / "store")
    populate_reports(store)
    return store
