"""The reliability scorecard: a pytest plugin behind ``make reliability``.

A test proves one of the fault scenarios of the reliability suite by carrying the marker
``@pytest.mark.scenario(N, expected="...")`` (N from :data:`SCENARIOS`) and, while it runs,
saying what it saw through the ``observe`` fixture::

    @pytest.mark.scenario(3, expected="throttling and 5xx are retried; the upload succeeds")
    def test_x(observe):
        ...
        observe(f"{retries} retries, object intact")

``pytest -m scenario --scorecard PATH`` runs every such test (slow ones included) and writes
PATH: a JSON list of ``{scenario, test, expected, observed, passed, seconds}``, one row per
test. A test that fails gets its failure message as ``observed``; a scenario no test ran for
gets a failing row, so a scorecard can never be green by leaving a scenario out.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

SCENARIOS = {
    1: "Spot preemption during search",
    2: "Crash of the search driver or of a full-training worker",
    3: "S3 faults (throttling, 5xx, permanent failure)",
    4: "MLflow server down during registration",
    5: "TorchServe worker crash during the canary",
    6: "Hostile requests to the serving endpoint",
    7: "Hostile drops at 10x volume; concurrent manual triggers",
    8: "Gate safety",
    9: "Node loss on the local multi-node cluster (spot reclaim)",
    10: "Airflow task killed while its Ray job runs",
}

_observed = pytest.StashKey[list]()
_rows: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--scorecard", metavar="PATH", default=None,
                     help="write the reliability scorecard (JSON) of the scenario tests that ran to PATH")  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line("markers", "scenario(n, expected): proves reliability scenario n (see tests/support/scorecard.py)")


def _scenario(item) -> tuple[int, str] | None:
    marker = item.get_closest_marker("scenario")
    if marker is None:
        return None
    number = marker.args[0] if marker.args else marker.kwargs.get("n")
    if number not in SCENARIOS:
        raise pytest.UsageError(f"{item.nodeid}: scenario {number!r} is not one of {sorted(SCENARIOS)}")
    expected = marker.kwargs.get("expected") or (marker.args[1] if len(marker.args) > 1 else "")
    if not expected:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.scenario needs expected='...'")
    return number, expected


@pytest.fixture
def observe(request):
    """Record what the scenario test observed (one or more short sentences)."""
    notes = request.node.stash.setdefault(_observed, [])
    return notes.append


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    found = _scenario(item)
    if found is None:
        return report
    number, expected = found
    if report.when == "call" or (report.when == "setup" and not report.passed):
        notes = item.stash.get(_observed, [])
        observed = "; ".join(notes)
        if not report.passed:
            crash = getattr(report.longrepr, "reprcrash", None)
            lines = report.longreprtext.strip().splitlines()
            why = " ".join(crash.message.split()) if crash is not None else (lines[-1] if lines else "")
            observed = (observed + "; " if observed else "") + f"{report.outcome} in {report.when}: {why[:400]}"
        _rows.append({
            "scenario": f"{number}. {SCENARIOS[number]}",
            "test": item.nodeid,
            "expected": expected,
            "observed": observed or "(nothing recorded)",
            "passed": bool(report.passed and report.when == "call"),
            "seconds": round(report.duration, 1),
        })
    return report


def scorecard_rows() -> list[dict]:
    """The rows collected so far, plus a failing row for every scenario no test ran for."""
    rows = list(_rows)
    ran = {int(r["scenario"].split(".")[0]) for r in rows}
    for number, title in SCENARIOS.items():
        if number not in ran:
            rows.append({"scenario": f"{number}. {title}", "test": None, "expected": "at least one test proves it",
                         "observed": "no test of this scenario ran", "passed": False, "seconds": 0.0})  # fmt: skip
    return sorted(rows, key=lambda r: (int(r["scenario"].split(".")[0]), r["test"] or ""))


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--scorecard")
    if not path:
        return
    rows = scorecard_rows()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".scorecard-")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
    os.replace(tmp, target)
    if any(not r["passed"] for r in rows) and session.exitstatus == 0:
        session.exitstatus = 1  # a scenario that no test ran fails the run too


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    path = config.getoption("--scorecard")
    if not path:
        return
    rows = scorecard_rows()
    tr = terminalreporter
    tr.section("reliability scorecard")
    for r in rows:
        tr.write_line(f"{'PASS' if r['passed'] else 'FAIL'}  {r['scenario']:<62} {r['test'] or '-'}")
    passed = sum(r["passed"] for r in rows)
    tr.write_line(f"{passed}/{len(rows)} rows passed; written to {path}")
