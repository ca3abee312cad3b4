"""Fixtures of the DAG and plugin tests; the helpers (and Airflow's environment, pinned
before Airflow is imported) live in ``dag_test_support.py``."""

from __future__ import annotations

import pytest

from dag_test_support import populate_reports


@pytest.fixture
def report_store(tmp_path):
    from pipeline.storage import LocalStore

    store = LocalStore(tmp_path / "store")
    populate_reports(store)
    return store
