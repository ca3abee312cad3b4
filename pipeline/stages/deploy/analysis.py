"""The canary's analysis of one interval: per-version measurements and the checks that pass or fail it.

:func:`measure_interval` replays one window (:mod:`pipeline.stages.deploy.replay`) and reads
the router's access log and the backend's counters around it. Per version
(:func:`version_stats`): error rate and user-facing p50/p95 latency (router log; the client's
own view when the router keeps none), p95 service time (the handler's time per request, from
the responses), empty-transcript rate, and TorchServe's mean inference/queue time. WER comes
from the paired requests (:func:`paired_wer`), worker restarts from the backend
(:func:`worker_health`). :func:`evaluate_interval` applies the ``canary:`` thresholds.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.asr.metrics import word_errors
from pipeline.config import CanaryConfig
from pipeline.serving.backend import ServingBackend, VersionCounters, VersionInfo
from pipeline.serving.router import RoutedRequest, Router
from pipeline.stages.deploy.replay import ReplayUtterance, Reply, replay_interval


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def version_stats(
    version: str,
    replies: list[Reply],
    routed: list[RoutedRequest] | None,
    counters: VersionCounters | None = None,
) -> dict[str, Any]:
    """Requests, errors, latency and empty transcripts of one version in one interval.

    Requests, errors and latency come from the router's log when it keeps one (all traffic
    the router sent to the version, including other clients'), else from the replay client.
    A request is an error when it ended in 5xx or was abandoned waiting for an answer (nginx
    499 / client timeout); 4xx (bad input) is not. Latency is that of successful requests.

    ``service_*``: the handler's own time per request (from the responses; queueing
    excluded). That is what the canary compares between versions: the router's latency
    includes queueing, which depends on each version's traffic share (at the 100 % step
    production only gets the paired probes), so comparing it would blame the canary for load.
    """
    mine = [r for r in replies if r.version == version]
    if routed is not None:
        log = [r for r in routed if r.version == version]
        bad = [r for r in log if r.status >= 500 or r.status == 499]  # 499: the client gave up waiting
        latencies = [r.latency_s * 1000.0 for r in log if r.status == 200]
        requests_n, errors, source = len(log), len(bad), "router_log"
    else:
        bad = [r for r in mine if r.status == 0 or r.status >= 500]
        latencies = [r.latency_s * 1000.0 for r in mine if r.status == 200]
        requests_n, errors, source = len(mine), len(bad), "client"
    ok = [r for r in mine if r.status == 200]
    service = [r.service_ms for r in ok if r.service_ms is not None]
    empty = sum(1 for r in ok if not (r.text or "").strip())
    return {
        "version": version,
        "source": source,
        "requests": requests_n,
        "errors": errors,
        "error_rate": errors / requests_n if requests_n else None,
        "latency_p50_ms": _percentile(latencies, 50),
        "latency_p95_ms": _percentile(latencies, 95),
        "service_p50_ms": _percentile(service, 50),
        "service_p95_ms": _percentile(service, 95),
        "replayed": len(mine),
        "answered": len(ok),
        "empty": empty,
        "empty_rate": empty / len(ok) if ok else None,
        "ts_mean_inference_ms": counters.mean_inference_ms() if counters else None,
        "ts_mean_queue_ms": (counters.queue_us / counters.requests / 1000.0) if counters and counters.requests else None,
        "sample_errors": sorted({r.error for r in mine if r.error})[:5],
    }


def paired_wer(replies: list[Reply], utts: list[ReplayUtterance], production: str, candidate: str) -> dict[str, Any]:
    """WER of both versions on the paired requests that both answered (the same audio)."""
    answers: dict[int, dict[str, str]] = {}
    for r in replies:
        if r.kind == "paired" and r.status == 200 and r.text is not None and r.target in (production, candidate):
            answers.setdefault(r.utt, {})[r.target] = r.text
    both = [(u, a) for u, a in answers.items() if production in a and candidate in a]
    err_p = err_c = words = 0
    for u, a in both:
        ep, w = word_errors(utts[u].text, a[production])
        ec, _ = word_errors(utts[u].text, a[candidate])
        err_p, err_c, words = err_p + ep, err_c + ec, words + w
    return {
        "pairs": len(both),
        "words": words,
        "production_wer": err_p / words if words else None,
        "candidate_wer": err_c / words if words else None,
        "delta": (err_c - err_p) / words if words else None,
    }


def _check(name: str, passed: bool, value: Any, limit: Any, detail: str = "") -> dict[str, Any]:
    return {"check": name, "passed": bool(passed), "value": value, "limit": limit, "detail": detail}


def worker_health(before: VersionInfo | None, after: VersionInfo | None) -> dict[str, Any] | None:
    """The candidate's workers over an interval: restarted (id changed) and not-ready ones; ``None`` if unknown."""
    if before is None or after is None:
        return None
    restarted = sorted(set(before.worker_ids) - set(after.worker_ids)) if before.worker_ids and after.worker_ids else []
    return {"workers": after.workers, "ready": after.ready_workers, "restarted": len(restarted),
            "not_ready": max(0, after.workers - after.ready_workers)}  # fmt: skip


def evaluate_interval(
    prod: dict[str, Any], cand: dict[str, Any], wer: dict[str, Any], cfg: CanaryConfig,
    workers: dict[str, Any] | None = None,
) -> tuple[bool, list[dict[str, Any]]]:
    """Apply the thresholds to one interval's measurements; ``(passed, checks)``.

    ``workers`` (:func:`worker_health`) adds the check ``candidate_workers``: a candidate
    worker that crashed and was restarted during the interval, or one not ready at its end,
    fails it, whether or not a request happened to hit the crash.
    """
    checks = []
    if workers is not None:
        bad = workers["restarted"] + workers["not_ready"]
        checks.append(
            _check("candidate_workers", bad == 0 and workers["ready"] >= 1, bad, 0,
                   f"{workers['restarted']} restarted, {workers['not_ready']} not ready of {workers['workers']} "
                   "candidate workers")  # fmt: skip
        )
    checks.append(
        _check("traffic", cand["requests"] >= cfg.min_canary_requests, cand["requests"], cfg.min_canary_requests,
               "canary requests in the interval")  # fmt: skip
    )
    rate = cand["error_rate"]
    checks.append(_check("error_rate", rate is not None and rate <= cfg.max_error_rate, rate, cfg.max_error_rate))
    cp, pp = cand["service_p95_ms"], prod["service_p95_ms"]
    if cp is None:
        checks.append(_check("p95_latency", False, None, cfg.max_latency_ratio, "no successful canary request to time"))
    elif pp is None or pp <= 0:
        checks.append(_check("p95_latency", True, None, cfg.max_latency_ratio, "no production latency to compare with"))
    else:
        ratio = cp / pp
        ok = ratio <= cfg.max_latency_ratio or (cp - pp) <= cfg.latency_slack_ms
        checks.append(
            _check("p95_latency", ok, round(ratio, 3), cfg.max_latency_ratio,
                   f"canary p95 service time {cp:.1f} ms vs production {pp:.1f} ms (slack {cfg.latency_slack_ms:g} ms)")  # fmt: skip
        )
    if cfg.max_p95_ms is not None:
        lp = cand["latency_p95_ms"]
        checks.append(
            _check("p95_latency_slo", lp is not None and lp <= cfg.max_p95_ms, lp, cfg.max_p95_ms,
                   "canary p95 as clients see it (router view, queueing included)")  # fmt: skip
        )
    ce, pe = cand["empty_rate"], prod["empty_rate"]
    if ce is None:
        checks.append(_check("empty_transcripts", True, None, cfg.max_empty_rate_increase, "no answered canary request"))
    else:
        inc = ce - (pe or 0.0)
        checks.append(_check("empty_transcripts", inc <= cfg.max_empty_rate_increase, round(inc, 4), cfg.max_empty_rate_increase,
                             f"canary {ce:.3f} vs production {(pe or 0.0):.3f}"))  # fmt: skip
    if wer["delta"] is None:
        checks.append(_check("wer", True, None, cfg.max_wer_increase, "no paired answers to compare (see error_rate)"))
    else:
        checks.append(
            _check("wer", wer["delta"] <= cfg.max_wer_increase, round(wer["delta"], 4), cfg.max_wer_increase,
                   f"candidate {wer['candidate_wer']:.4f} vs production {wer['production_wer']:.4f} on {wer['pairs']} pairs")  # fmt: skip
        )
    return all(c["passed"] for c in checks), checks


def measure_interval(
    backend: ServingBackend,
    router: Router,
    utts: list[ReplayUtterance],
    *,
    production: str,
    candidate: str,
    cfg: CanaryConfig,
    weight: float,
    index: int,
) -> dict[str, Any]:
    """Replay one analysis interval at ``weight`` and measure and check both versions in it."""
    started = time.monotonic()
    mark = router.log_mark()
    before = _safe_counters(backend)
    workers_before = _safe_version(backend, candidate)
    offset = index * (cfg.window_requests + cfg.paired_requests)
    replies = replay_interval(router, utts, production=production, candidate=candidate, offset=offset, cfg=cfg)
    routed = _router_log(router, mark, expected=sum(1 for r in replies if r.status))
    after = _safe_counters(backend)

    def stats(version: str) -> dict[str, Any]:
        counters = after.get(version, VersionCounters()).minus(before.get(version)) if after else None
        return version_stats(version, replies, routed, counters)

    prod, cand = stats(production), stats(candidate)
    wer = paired_wer(replies, utts, production, candidate)
    workers = worker_health(workers_before, _safe_version(backend, candidate))
    passed, checks = evaluate_interval(prod, cand, wer, cfg, workers)
    split = [r for r in replies if r.kind == "split"]
    return {
        "index": index,
        "weight": weight,
        "passed": passed,
        "checks": checks,
        "production": prod,
        "candidate": cand,
        "wer": wer,
        "workers": workers,
        "replayed": len(replies),
        "split_requests": len(split),
        "split_to_candidate": sum(1 for r in split if r.version == candidate),
        "unattributed_errors": sum(1 for r in split if r.version is None and (r.status == 0 or r.status >= 500)),
        "duration_s": round(time.monotonic() - started, 3),
    }


def _safe_version(backend: ServingBackend, version: str) -> VersionInfo | None:
    try:
        return next((v for v in backend.versions() if v.version == version), None)
    except Exception:  # noqa: BLE001 - a management API hiccup is no verdict on the candidate
        return None


def _safe_counters(backend: ServingBackend) -> dict[str, VersionCounters]:
    try:
        return backend.version_counters()
    except Exception:  # noqa: BLE001 - metrics are recorded, never required
        return {}


def _router_log(router: Router, mark: Any, expected: int, wait_s: float = 2.0) -> list[RoutedRequest] | None:
    """The router's log since ``mark``, waiting briefly for lines written after the response."""
    deadline = time.monotonic() + wait_s
    while True:
        routed = router.requests_since(mark)
        if routed is None or len(routed) >= expected or time.monotonic() >= deadline:
            return routed
        time.sleep(0.05)
