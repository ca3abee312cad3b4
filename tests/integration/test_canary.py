"""Canary deployment against real TorchServe and nginx on 127.0.0.1.

One TorchServe (1 worker per version, tiny random-weight models) and one nginx serve the
whole module (tests/support/serving_env.py). Scenarios: cold start, a good candidate promoted, a
candidate that fails on some inputs and a much slower one rolled back while production
keeps serving, the checksum check at registration, a failing promotion hook, the serving
rollback and a restarted server. Hostile requests, token refusal and worker crashes are in
tests/reliability/test_serving_faults.py.
"""

from __future__ import annotations

import json

import pytest
import requests
from support.serving_env import FAIL_ABOVE_S, MODEL_KEY, Traffic, deploy_version, env_fixture, make_ctx
from support.wavfactory import make_audio

from pipeline.serving.archive import ArchiveError, ModelArchive, build_archive
from pipeline.serving.router import ROUTED_VERSION_HEADER
from pipeline.serving.state import PROMOTED, ROLLED_BACK, read_serving_state
from pipeline.stages.deploy.errors import DeployError
from pipeline.stages.deploy.rollback import rollback_serving
from pipeline.stages.deploy.stage import deploy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


env = env_fixture("canary")


@pytest.fixture(scope="module")
def production(env):
    """Cold start with version 1, then a good candidate (same weights) as version 2: promoted."""
    summary, record = deploy_version(env, "run-1", "1")
    assert summary["outcome"] == PROMOTED and summary["reason"] == "cold_start"
    assert env.backend.default_version() == "1" and env.router.weights() == {"1": 100.0}
    with Traffic(env.router) as traffic:
        summary, record = deploy_version(env, "run-2", "2")
    return summary, record, traffic


def test_good_candidate_is_promoted(env, production):
    summary, record, traffic = production
    assert summary["outcome"] == PROMOTED, json.dumps(record["steps"], indent=1)[:4000]
    assert [s["weight"] for s in record["steps"]] == [5, 50, 100]
    for step in record["steps"]:
        for interval in step["intervals"]:
            assert interval["passed"], interval["checks"]
            assert interval["wer"]["pairs"] > 0 and interval["wer"]["delta"] == 0  # same weights: same transcripts
            assert interval["candidate"]["source"] == "router_log"
            assert interval["candidate"]["requests"] >= env.canary.min_canary_requests
            assert interval["production"]["errors"] == 0 and interval["candidate"]["errors"] == 0
    assert env.promoted == ["1", "2"]  # on_promote: cold start, then the canary
    assert env.backend.default_version() == "2"
    assert [v.version for v in env.backend.versions()] == ["2"]  # the old version left after the grace period
    assert env.router.weights() == {"2": 100.0}
    state = read_serving_state(env.store)
    assert state["production"]["version"] == "2" and state["previous"]["version"] == "1"
    assert env.store.exists(state["previous"]["archive_key"])  # kept for rollback
    # clients saw no failure while the weights moved
    assert traffic.results and all(status == 200 for _, status, _ in traffic.results), traffic.results[:5]
    assert {v for v, _, _ in traffic.results} <= {"1", "2"}


@pytest.mark.parametrize(
    ("name", "options", "failing_check"),
    [
        ("fails-on-long-inputs", {"fail_above_s": FAIL_ABOVE_S}, "error_rate"),
        ("much-slower", {"delay_ms": 400}, "p95_latency"),
    ],
)
def test_bad_candidate_is_rolled_back_while_production_serves(env, production, name, options, failing_check):
    version = f"bad-{name}"
    with Traffic(env.router) as traffic:
        summary, record = deploy_version(env, f"run-{name}", version, handler_options=options)
    assert summary["outcome"] == ROLLED_BACK, record.get("reason")
    assert failing_check in record["reason"]
    intervals = [i for s in record["steps"] for i in s["intervals"]]
    assert len(intervals) == env.canary.max_consecutive_failures and not any(i["passed"] for i in intervals)
    assert all(not c["passed"] for i in intervals for c in i["checks"] if c["check"] == failing_check)
    for i in intervals:  # production was measured clean in the same windows
        assert i["production"]["errors"] == 0
    # production untouched, canary gone
    assert env.backend.default_version() == "2"
    assert [v.version for v in env.backend.versions()] == ["2"]
    assert env.router.weights() == {"2": 100.0}
    assert read_serving_state(env.store)["production"]["version"] == "2"
    prod_side = [(s, e) for v, s, e in traffic.results if v == "2"]
    assert prod_side and all(s == 200 for s, _ in prod_side), prod_side[:5]
    assert all(v in ("2", version) for v, _, _ in traffic.results), [r for r in traffic.results if r[0] is None][:5]


def test_registration_verifies_the_checksum(env, production, tmp_path):
    archive = build_archive(env.model_path, tmp_path, model_name="asr", version="tampered")
    tampered = ModelArchive(archive.path, archive.model_name, archive.version, "0" * 64, archive.size)
    with pytest.raises(ArchiveError, match="sha256"):
        env.backend.register(tampered)
    assert [v.version for v in env.backend.versions()] == ["2"]


def test_failing_promotion_hook_switches_serving_back(env, production):
    """If the MLflow alias move (on_promote) fails, serving returns to production and the stage fails."""

    def broken_hook(version: str) -> None:
        raise RuntimeError("registry unavailable")

    with pytest.raises(DeployError, match="registry unavailable"):
        deploy(make_ctx(env, "run-hook"), candidate_model_key=MODEL_KEY, version="3", on_promote=broken_hook,
               backend=env.backend, router=env.router, serving=env.serving, canary=env.canary)  # fmt: skip
    record = json.loads(env.store.get_text("runs/run-hook/deploy/canary.json"))
    assert record["outcome"] == ROLLED_BACK and "promotion reverted" in record["reason"]
    assert not make_ctx(env, "run-hook").is_complete("deploy")  # a retry canaries again
    assert env.backend.default_version() == "2" and [v.version for v in env.backend.versions()] == ["2"]
    assert env.router.weights() == {"2": 100.0}
    assert read_serving_state(env.store)["production"]["version"] == "2"


def test_rollback_restores_the_previous_version(env, production):
    # a restart loses TorchServe's registrations: the kept archive is re-registered (checksum verified)
    result = rollback_serving(make_ctx(env, "run-rollback"), backend=env.backend, router=env.router, grace_period_s=0.2,
                              serving=env.serving, canary=env.canary)  # fmt: skip
    assert result["outcome"] == "restored" and result["version"] == "1" and result["replaced"] == "2"
    assert env.backend.default_version() == "1"
    assert [v.version for v in env.backend.versions()] == ["1"]
    assert env.router.weights() == {"1": 100.0}
    url, headers = env.router.target()
    r = requests.post(url, data=make_audio(1.0), headers={**headers, "Content-Type": "audio/wav"}, timeout=30)
    assert r.status_code == 200 and r.headers[ROUTED_VERSION_HEADER] == "1" and r.json()["model_version"] == "1"
    state = read_serving_state(env.store)
    assert state["production"]["version"] == "1" and state["previous"]["version"] == "2"


def test_a_restarted_server_is_recovered_by_the_next_deploy(env, production):
    """TorchServe restarts with new ports, new keys and no models: deploy re-registers production, nginx follows."""
    assert read_serving_state(env.store)["production"]["version"] == "1"  # after the rollback above
    old_port = env.backend.inference_url
    env.backend.stop()
    env.backend.ensure_running()
    assert env.backend.inference_url != old_port and env.backend.versions() == []
    summary, record = deploy_version(env, "run-restart", "1")
    assert summary["outcome"] == PROMOTED and summary["reason"] == "already_in_production"
    assert env.backend.default_version() == "1"
    url, headers = env.router.target()
    r = requests.post(url, data=make_audio(1.0), headers={**headers, "Content-Type": "audio/wav"}, timeout=30)
    assert r.status_code == 200 and r.json()["model_version"] == "1"
