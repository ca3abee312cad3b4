"""The canary's analysis and control loop (pure functions) and the generated nginx config."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.config import CanaryConfig
from pipeline.serving.backend import VersionInfo
from pipeline.serving.nginx import find_nginx, render_nginx_conf
from pipeline.serving.router import RoutedRequest, RouterError, check_weights
from pipeline.serving.state import PROMOTED, ROLLED_BACK
from pipeline.stages.deploy.analysis import evaluate_interval, paired_wer, version_stats, worker_health
from pipeline.stages.deploy.replay import ReplayUtterance, Reply
from pipeline.stages.deploy.stage import run_steps


def stats(requests=50, errors=0, p95=20.0, empty_rate=0.0, latency_p95=40.0):
    return {"requests": requests, "errors": errors, "error_rate": errors / requests if requests else None,
            "service_p95_ms": p95, "latency_p95_ms": latency_p95, "empty_rate": empty_rate}  # fmt: skip


NO_WER = {"pairs": 0, "words": 0, "production_wer": None, "candidate_wer": None, "delta": None}


def checks_failed(cfg, prod, cand, wer=NO_WER):
    passed, checks = evaluate_interval(prod, cand, wer, cfg)
    return passed, sorted(c["check"] for c in checks if not c["passed"])


def test_healthy_interval_passes():
    wer = {"pairs": 10, "words": 30, "production_wer": 0.1, "candidate_wer": 0.1, "delta": 0.0}
    assert checks_failed(CanaryConfig(), stats(), stats(), wer) == (True, [])


@pytest.mark.parametrize(
    ("cand", "wer_delta", "failed"),
    [
        (stats(errors=5), None, ["error_rate"]),
        (stats(p95=400.0), None, ["p95_latency"]),
        (stats(empty_rate=0.5), None, ["empty_transcripts"]),
        (stats(), 0.10, ["wer"]),
        (stats(requests=2), None, ["traffic"]),
        (stats(requests=0, p95=None), None, ["error_rate", "p95_latency", "traffic"]),
    ],
)
def test_each_threshold_fails_its_check(cand, wer_delta, failed):
    wer = NO_WER if wer_delta is None else {"pairs": 10, "words": 30, "production_wer": 0.1, "candidate_wer": 0.1 + wer_delta, "delta": wer_delta}
    assert checks_failed(CanaryConfig(), stats(), cand, wer) == (False, failed)


def test_latency_slack_absorbs_noise_on_fast_models():
    cfg = CanaryConfig(max_latency_ratio=1.5, latency_slack_ms=20)
    assert checks_failed(cfg, stats(p95=2.0), stats(p95=8.0))[0]  # 4x but only 6 ms slower
    assert not checks_failed(cfg, stats(p95=10.0), stats(p95=40.0))[0]
    assert checks_failed(cfg, stats(p95=500.0), stats(p95=700.0))[0]  # 1.4x


def test_optional_ceiling_on_what_clients_see():
    assert checks_failed(CanaryConfig(), stats(), stats(latency_p95=900.0)) == (True, [])
    assert checks_failed(CanaryConfig(max_p95_ms=500), stats(), stats(latency_p95=900.0)) == (False, ["p95_latency_slo"])


def _measure(results):
    it = iter(results)

    def measure(weight, index):
        ok = next(it)
        return {"passed": ok, "checks": [{"check": "error_rate", "passed": ok}], "weight": weight}

    return measure


def test_one_blip_does_not_roll_back():
    cfg = CanaryConfig(steps=[5, 25, 100], max_consecutive_failures=2)
    applied = []
    outcome, reason, steps = run_steps(cfg, applied.append, _measure([True, False, True, True]))
    assert outcome == PROMOTED and applied == [5, 25, 100]
    assert [len(s["intervals"]) for s in steps] == [1, 2, 1]


def test_consecutive_failures_roll_back_across_steps():
    cfg = CanaryConfig(steps=[5, 25, 100], max_consecutive_failures=3, intervals_per_step=2)
    applied = []
    outcome, reason, steps = run_steps(cfg, applied.append, _measure([True, True, True, False, False, False]))
    assert outcome == ROLLED_BACK and applied == [5, 25]
    assert "3 consecutive failing intervals at 25%" in reason and "error_rate" in reason
    assert steps[-1]["result"] == "failed"


def test_version_stats_from_the_router_log_and_the_client():
    routed = [RoutedRequest(0, "2", 200, 200, 0.010, "/p"), RoutedRequest(0, "2", 500, 500, 0.002, "/p"),
              RoutedRequest(0, "2", 499, None, 5.0, "/p"), RoutedRequest(0, "1", 200, 200, 0.005, "/p"),
              RoutedRequest(0, None, 415, None, 0.0, "/p")]  # fmt: skip
    replies = [Reply("split", 0, None, 200, "2", 0.011, "", service_ms=3.0), Reply("split", 1, None, 200, "2", 0.012, "one", service_ms=5.0),
               Reply("paired", 2, "2", 500, "2", 0.003, None, "model_error: x")]  # fmt: skip
    s = version_stats("2", replies, routed)
    assert (s["source"], s["requests"], s["errors"]) == ("router_log", 3, 2)
    assert s["latency_p95_ms"] == pytest.approx(10.0) and s["service_p95_ms"] == pytest.approx(4.9)
    assert s["empty_rate"] == 0.5 and s["sample_errors"] == ["model_error: x"]
    c = version_stats("2", replies + [Reply("paired", 3, "2", 0, "2", 30.0, None, "ReadTimeout")], None)
    assert (c["source"], c["requests"], c["errors"]) == ("client", 4, 2)


def test_paired_wer_uses_only_pairs_both_versions_answered():
    utts = [ReplayUtterance(f"u{i}", "one two three", b"", "audio/wav", 1.0) for i in range(3)]
    replies = [
        Reply("paired", 0, "1", 200, "1", 0.01, "one two three"), Reply("paired", 0, "2", 200, "2", 0.01, "one two"),
        Reply("paired", 1, "1", 200, "1", 0.01, "one two three"), Reply("paired", 1, "2", 500, "2", 0.01, None),
        Reply("split", 2, None, 200, "2", 0.01, "nine"),
    ]  # fmt: skip
    w = paired_wer(replies, utts, "1", "2")
    assert (w["pairs"], w["words"], w["production_wer"]) == (1, 3, 0.0) and w["delta"] == pytest.approx(1 / 3)


def test_weights_are_validated():
    assert check_weights({"1": 95, "2": 5}) == {"1": 95.0, "2": 5.0}
    for bad in ({"1": 50}, {"1": 101, "2": -1}, {"../x": 100}):
        with pytest.raises(RouterError):
            check_weights(bad)


def _conf(weights, **kw):
    args = dict(port=18888, host="127.0.0.1", model_name="asr", upstream_base="http://127.0.0.1:18080", weights=weights,
                generation=3, auth_header="Bearer k3y-_x", max_body_bytes=1048576, timeout_s=30)  # fmt: skip
    args.update(kw)
    return render_nginx_conf(**args)


def test_nginx_conf_splits_between_explicit_versions():
    conf = _conf({"1": 95, "2": 5})
    assert '5% "2";' in conf and '* "1";' in conf
    assert "proxy_pass http://asr_backend/predictions/asr/$asr_target$is_args$args;" in conf
    assert 'proxy_set_header Authorization "Bearer k3y-_x";' in conf
    assert "listen 127.0.0.1:18888;" in conf and "server 127.0.0.1:18080;" in conf
    assert '{"generation": 3' in conf
    assert 'return 503' in _conf({}) and "$asr_split_version;" not in _conf({}).split("location = /predictions/asr {")[1].split("}")[0]
    assert "proxy_set_header Authorization" not in _conf({"1": 100}, auth_header=None)
    with pytest.raises(RouterError):
        _conf({"1": 100}, auth_header='Bearer x"; evil')


@pytest.mark.parametrize("weights", [{}, {"1": 100}, {"1": 99.5, "2": 0.5}, {"a.b-c_d": 75, "2": 25}])
def test_nginx_accepts_the_generated_conf(tmp_path, weights):
    try:
        nginx = find_nginx("nginx")
    except RouterError as exc:
        pytest.skip(str(exc))
    for d in ("conf", "logs", "tmp"):
        (tmp_path / d).mkdir()
    conf = tmp_path / "conf" / "nginx.conf"
    conf.write_text(_conf(weights, run_as_root=__import__("os").geteuid() == 0))
    proc = subprocess.run([nginx, "-t", "-q", "-p", f"{tmp_path}/", "-c", str(conf), "-e", str(tmp_path / "logs" / "e.log")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("before", "after", "passed"),
    [
        (VersionInfo("c", workers=2, ready_workers=2, worker_ids=("10", "11")),
         VersionInfo("c", workers=2, ready_workers=2, worker_ids=("10", "11")), True),
        (VersionInfo("c", workers=2, ready_workers=2, worker_ids=("10", "11")),
         VersionInfo("c", workers=2, ready_workers=2, worker_ids=("10", "12")), False),  # one crashed, restarted
        (VersionInfo("c", workers=2, ready_workers=2, worker_ids=("10", "11")),
         VersionInfo("c", workers=2, ready_workers=1, worker_ids=("10", "11")), False),  # one not ready
        (VersionInfo("c", workers=1, ready_workers=1), VersionInfo("c", workers=1, ready_workers=1), True),  # no ids
    ],
)
def test_a_crashed_candidate_worker_fails_the_interval_without_any_error_seen(before, after, passed):
    workers = worker_health(before, after)
    ok, checks = evaluate_interval(stats(), stats(), NO_WER, CanaryConfig(), workers)
    check = next(c for c in checks if c["check"] == "candidate_workers")
    assert ok is passed and check["passed"] is passed and "candidate workers" in check["detail"]


def test_unknown_worker_state_adds_no_check():
    assert worker_health(None, VersionInfo("c")) is None
    _, checks = evaluate_interval(stats(), stats(), NO_WER, CanaryConfig(), None)
    assert "candidate_workers" not in {c["check"] for c in checks}
