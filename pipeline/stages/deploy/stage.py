"""Stage ``deploy``: ship a gated candidate through a canary, then promote it or roll it back.

``deploy(ctx, candidate_model_key=...)``:

1. builds the ``.mar`` (exported model + self-contained handler), keeps it as the stage's
   artifact ``runs/{run_id}/deploy/{model}-{version}.mar`` and verifies its sha256 before
   TorchServe registers it;
2. starts TorchServe if needed and makes sure production is registered (re-registering it
   from ``state/serving/archives/`` after a server restart); with no production yet it is a
   **cold start**: the candidate is registered, made default and routed 100 %, recorded as
   ``promoted`` with reason ``cold_start``;
3. registers the candidate as a new version beside production and steps the router's
   weight (``canary.steps``, e.g. 5 -> 25 -> 100 %), addressing both versions explicitly;
4. in every analysis interval (at most ``window_requests`` requests and ``window_s``
   seconds) replays held-out labeled audio (the golden manifest) through the router, and
   sends ``paired_requests`` of those utterances to **both** versions explicitly so WER
   compares them on exactly the same audio (at 5 % the split alone gives the canary too few
   utterances for a WER);
5. analyses per version: error rate and user-facing p50/p95 latency (from the router's
   access log; the client's own view when the router keeps none), p95 service time (the
   handler's time per request, from the responses: it is what is compared with production,
   because queueing depends on each version's traffic share), empty-transcript rate and WER
   (from the responses), plus TorchServe's per-version mean inference/queue time
   (prometheus counters, recorded). An interval fails when a threshold is crossed; a step needs
   ``intervals_per_step`` passing intervals, and ``max_consecutive_failures`` failing
   intervals in a row roll back (one blip does not);
6. healthy: the candidate takes 100 %, becomes TorchServe's default, ``on_promote(version)``
   is called (the MLflow alias move), and the old version is unregistered once the router
   has drained its in-flight requests and ``grace_period_s`` has passed (its archive is kept
   for :func:`rollback_serving`); unhealthy: weight back to 0, in-flight requests drained,
   candidate unregistered, production untouched.

``runs/{run_id}/deploy/canary.json`` records the outcome (``promoted``/``rolled_back``), the
reason and every interval's measurements. Serving state that outlives runs (production and
previous version, their archive keys and checksums) is ``state/serving/state.json``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests

from pipeline.data.manifest import read_manifest, resolve_audio_key
from pipeline.serving.archive import ModelArchive, archive_name, build_archive, check_version, sha256_file, verify_archive
from pipeline.serving.backend import ServingBackend, VersionCounters, VersionInfo
from pipeline.serving.config import CanaryConfig, ServingConfig, canary_config, serving_config
from pipeline.serving.router import PROBE_HEADER, ROUTED_VERSION_HEADER, RoutedRequest, Router
from pipeline.storage import ObjectStore, join
from pipeline.asr.metrics import word_errors

STAGE = "deploy"
STATE_KEY = "state/serving/state.json"
ARCHIVE_PREFIX = "state/serving/archives"
CANARY_FILE = "canary.json"
PROMOTED, ROLLED_BACK = "promoted", "rolled_back"
_HISTORY_MAX = 100


class DeployError(RuntimeError):
    """The deploy could not run or could not finish cleanly; the message says what to do."""


# --------------------------------------------------------------------------------------
# services


def open_services(config: Any) -> tuple[ServingBackend, Router]:
    """The serving backend and router the configuration (or a ServingConfig) describes."""
    from pipeline.serving.torchserve import TorchServe

    serving = serving_config(config)
    backend = TorchServe(serving)
    return backend, open_router(serving, backend)


def open_router(serving: ServingConfig, backend: ServingBackend) -> Router:
    if serving.router == "istio":
        from pipeline.serving.istio import IstioRouter

        return IstioRouter(serving.istio, model_name=serving.model_name)
    from pipeline.serving.router import NginxRouter

    prefix = serving.nginx.prefix or str(serving.work_path() / "nginx")
    return NginxRouter(
        serving.nginx,
        prefix=prefix,
        model_name=serving.model_name,
        upstream=backend.upstream,
        max_body_bytes=serving.max_audio_bytes,
        timeout_s=serving.response_timeout_s,
    )


def serving_status(config: Any) -> dict[str, Any]:
    """What is running: TorchServe (ports, versions, default) and the router (URL, weights)."""
    backend, router = open_services(config)
    out: dict[str, Any] = {"torchserve": {"healthy": backend.healthy()}, "router": {}}
    if out["torchserve"]["healthy"]:
        out["torchserve"].update(
            inference=getattr(backend, "inference_url", None),
            management=getattr(backend, "management_url", None),
            default_version=backend.default_version(),
            versions=[{"version": v.version, "workers": v.workers, "ready": v.ready_workers} for v in backend.versions()],
        )
    with contextlib.suppress(Exception):
        out["router"] = {"url": router.target()[0], "weights": router.weights()}
    return out


def stop_serving(config: Any) -> dict[str, Any]:
    """Stop the local router and TorchServe (registrations are lost; the next deploy restores production)."""
    backend, router = open_services(config)
    router.stop()
    backend.stop()
    return {"stopped": True}


@contextlib.contextmanager
def _serving_lock(serving: ServingConfig) -> Iterator[None]:
    """One deploy or rollback at a time per serving work dir."""
    work = serving.work_path()
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "deploy.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeployError(f"another deploy or rollback is running (lock {work / 'deploy.lock'}); wait for it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# serving state (outlives runs)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_serving_state(store: ObjectStore) -> dict[str, Any]:
    if not store.exists(STATE_KEY):
        return {"production": None, "previous": None, "history": []}
    return json.loads(store.get_text(STATE_KEY))


def _write_serving_state(store: ObjectStore, state: dict[str, Any]) -> None:
    state["history"] = state.get("history", [])[-_HISTORY_MAX:]
    store.put_text(STATE_KEY, json.dumps(state, indent=2, sort_keys=True))


def _archive_record(archive: ModelArchive, key: str, **extra: Any) -> dict[str, Any]:
    return {"version": archive.version, "archive_key": key, "sha256": archive.sha256, "since": _now(), **extra}


def _prune_archives(store: ObjectStore, state: dict[str, Any]) -> None:
    keep = {r["archive_key"] for r in (state.get("production"), state.get("previous")) if r and r.get("archive_key")}
    for key in list(store.list(ARCHIVE_PREFIX + "/")):
        if key not in keep:
            store.delete(key)


def _fetch_archive(store: ObjectStore, record: dict[str, Any], model_name: str, local_dir: Path) -> ModelArchive:
    """Download a kept archive and verify it against the checksum recorded when it was built."""
    if not record.get("archive_key"):
        raise DeployError(f"version {record.get('version')} has no kept archive; it cannot be re-registered")
    local_dir.mkdir(parents=True, exist_ok=True)
    path = local_dir / archive_name(model_name, record["version"])
    store.download_file(record["archive_key"], path)
    verify_archive(path, record["sha256"])
    return ModelArchive(str(path), model_name, record["version"], record["sha256"], path.stat().st_size)


# --------------------------------------------------------------------------------------
# replay traffic


@dataclass(frozen=True)
class ReplayUtterance:
    utt_id: str
    text: str
    audio: bytes
    content_type: str
    duration: float


def load_replay_set(store: ObjectStore, golden_version: str, count: int, seed: int = 0) -> list[ReplayUtterance]:
    """Up to ``count`` held-out labeled utterances of ``golden/{version}/`` (a seeded sample)."""
    key = join("golden", golden_version, "manifest.jsonl")
    if not store.exists(key):
        raise DeployError(
            f"golden set not found at {store.uri(key)}: the canary replays it. Build it with "
            "'asr-retune demo-data' or set canary.golden_version"
        )
    utts = read_manifest(store, key)
    if not utts:
        raise DeployError(f"golden manifest {store.uri(key)} is empty")
    order = np.random.default_rng(seed).permutation(len(utts))[:count]
    out = []
    for i in order:
        u = utts[int(i)]
        audio_key = resolve_audio_key(key, u.audio_filepath)
        ctype = "audio/flac" if audio_key.lower().endswith(".flac") else "audio/wav"
        out.append(ReplayUtterance(u.utt_id, u.text, store.get_bytes(audio_key), ctype, u.duration))
    return out


@dataclass
class Reply:
    """One replayed request as the client saw it."""

    kind: str  # "split" (through the weighted route) or "paired" (explicit version)
    utt: int
    target: str | None  # explicit version for paired requests
    status: int  # 0 = transport error (timeout, connection refused)
    version: str | None  # the version that answered (router header / response body)
    latency_s: float
    text: str | None = None
    error: str | None = None
    service_ms: float | None = None  # the handler's time for this request (queueing excluded)


def _send(session: requests.Session, url: str, headers: dict[str, str], utt: ReplayUtterance, timeout: float) -> tuple[int, dict[str, Any] | None, str | None, float, str | None]:
    start = time.perf_counter()
    try:
        r = session.post(url, data=utt.audio, headers={**headers, "Content-Type": utt.content_type}, timeout=timeout)
    except requests.RequestException as exc:
        return 0, None, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:300]
    latency = time.perf_counter() - start
    try:
        body = r.json()
    except ValueError:
        body = None
    return r.status_code, body if isinstance(body, dict) else None, r.headers.get(ROUTED_VERSION_HEADER) or None, latency, None


def replay_interval(
    router: Router,
    utts: list[ReplayUtterance],
    *,
    production: str,
    candidate: str,
    offset: int,
    cfg: CanaryConfig,
) -> list[Reply]:
    """One analysis window of replayed traffic: split requests with paired probes interleaved."""
    n = len(utts)
    split = [("split", (offset + i) % n, None) for i in range(cfg.window_requests)]
    pairs = [(offset + cfg.window_requests + j) % n for j in range(cfg.paired_requests)]
    tasks: list[tuple[str, int, str | None]] = []
    every = max(1, len(split) // max(1, len(pairs)))
    for i, task in enumerate(split):
        if pairs and i % every == 0:
            u = pairs.pop(0)
            tasks += [("paired", u, production), ("paired", u, candidate)]
        tasks.append(task)
    for u in pairs:
        tasks += [("paired", u, production), ("paired", u, candidate)]

    deadline = time.monotonic() + cfg.window_s
    it = iter(tasks)
    lock = threading.Lock()
    replies: list[Reply] = []

    def worker() -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                with lock:
                    task = next(it, None)
                if task is None:
                    return
                kind, u, target = task
                url, headers = router.target(target)
                headers = {**headers, PROBE_HEADER: "paired" if kind == "paired" else "replay"}
                timeout = max(1.0, min(cfg.request_timeout_s, deadline - time.monotonic() + cfg.request_timeout_s))
                status, body, routed, latency, error = _send(session, url, headers, utts[u], timeout)
                version = target or routed or (str(body.get("model_version")) if body and body.get("model_version") else None)
                text = body.get("text") if (status == 200 and body and isinstance(body.get("text"), str)) else None
                service = body.get("service_ms") if (status == 200 and body) else None
                if status and status != 200 and body:
                    error = f"{body.get('error') or body.get('type')}: {body.get('message')}"[:300]
                with lock:
                    replies.append(
                        Reply(kind, u, target, status, version, latency, text, error,
                              float(service) if isinstance(service, (int, float)) else None)  # fmt: skip
                    )

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(cfg.concurrency, len(tasks)) or 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


# --------------------------------------------------------------------------------------
# analysis (pure functions)


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


def run_steps(
    cfg: CanaryConfig,
    apply_weight: Callable[[float], None],
    measure: Callable[[float, int], dict[str, Any]],
) -> tuple[str, str, list[dict[str, Any]]]:
    """The canary's control loop, free of I/O: ``(outcome, reason, steps)``.

    ``measure(weight, interval_index)`` returns an interval's measurements with ``passed``
    and ``checks``. A step is left after ``intervals_per_step`` passing intervals;
    ``max_consecutive_failures`` failing intervals in a row (across steps) roll back.
    """
    steps: list[dict[str, Any]] = []
    consecutive = 0
    index = 0
    for weight in cfg.steps:
        apply_weight(weight)
        step = {"weight": weight, "intervals": [], "started_at": _now()}
        steps.append(step)
        passes = 0
        while passes < cfg.intervals_per_step:
            m = measure(weight, index)
            index += 1
            step["intervals"].append(m)
            if m["passed"]:
                passes += 1
                consecutive = 0
                continue
            consecutive += 1
            if consecutive >= cfg.max_consecutive_failures:
                failed = sorted({c["check"] for c in m["checks"] if not c["passed"]})
                step["result"] = "failed"
                return ROLLED_BACK, f"{consecutive} consecutive failing intervals at {weight:g}%: {', '.join(failed)}", steps
        step["result"] = "passed"
    return PROMOTED, "healthy at every step", steps


# --------------------------------------------------------------------------------------
# the stage


def _derive_version(run_id: str, model_sha: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-._")[:40] or "run"
    return f"{base}-{model_sha[:8]}"


def _load_export_meta(path: Path) -> dict[str, Any]:
    from pipeline.asr.export import load_exported

    try:
        return dict(load_exported(path).meta)
    except ValueError as exc:
        raise DeployError(f"the candidate is not a deployable export: {exc}") from None


def _ensure_weights(router: Router, weights: dict[str, float]) -> None:
    if router.weights() != weights:
        router.set_weights(weights)


def deploy(
    ctx: Any,
    *,
    candidate_model_key: str,
    version: str | None = None,
    on_promote: Callable[[str], None] | None = None,
    backend: ServingBackend | None = None,
    router: Router | None = None,
    handler_options: dict[str, Any] | None = None,
    serving: ServingConfig | None = None,
    canary: CanaryConfig | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Stage ``deploy``: canary the exported model at ``candidate_model_key`` (a store key).

    ``version``: the TorchServe version name (default: derived from the run id and the
    model's checksum). ``on_promote(version)`` runs after the candidate became TorchServe's
    default (the MLflow alias move); if it raises, serving is switched back to the previous
    production and :class:`DeployError` is raised (the stage stays incomplete, a retry
    canaries again). ``handler_options`` are merged into the archive's handler_config.json
    (fault-injection knobs for tests). ``serving``/``canary`` override the configuration's
    sections. Returns the stage summary; a completed stage is skipped.
    """
    serving = serving or serving_config(ctx.config)
    canary = canary or canary_config(ctx.config)

    def body() -> dict[str, Any]:
        b, r = backend, router
        if b is None or r is None:
            ob, orr = open_services(serving)
            b, r = b or ob, r or orr
        return _deploy(ctx, candidate_model_key, version, on_promote, b, r, handler_options, serving, canary)

    return ctx.run_stage(STAGE, body, force=force)


def _deploy(
    ctx: Any,
    candidate_model_key: str,
    version: str | None,
    on_promote: Callable[[str], None] | None,
    backend: ServingBackend,
    router: Router,
    handler_options: dict[str, Any] | None,
    serving: ServingConfig,
    cfg: CanaryConfig,
) -> dict[str, Any]:
    store = ctx.store
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    record: dict[str, Any] = {"run_id": ctx.run_id, "started_at": _now(), "config": cfg.model_dump(mode="json"), "steps": []}

    def write_record() -> str:
        record["finished_at"] = _now()
        record["duration_s"] = round(time.monotonic() - t0, 3)
        record["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        key = ctx.stage_key(STAGE, CANARY_FILE)
        store.put_text(key, json.dumps(record, indent=2, sort_keys=True, default=str))
        return store.uri(key)

    with _serving_lock(serving), tempfile.TemporaryDirectory(prefix="asr-deploy-") as tmp:
        tmp_path = Path(tmp)
        # -- the candidate archive ------------------------------------------------------
        t = time.monotonic()
        model_path = tmp_path / "model.pt"
        store.download_file(candidate_model_key, model_path)
        meta = _load_export_meta(model_path)
        model_sha = sha256_file(model_path)
        version = check_version(version or _derive_version(ctx.run_id, model_sha))
        options = {**serving.handler_options(), **(handler_options or {})}
        archive = build_archive(model_path, tmp_path / "mar", model_name=serving.model_name, version=version, handler_options=options)
        archive_key = ctx.stage_key(STAGE, archive.file_name)
        store.upload_file(archive_key, archive.path)
        timings["archive"] = time.monotonic() - t
        record["candidate"] = {
            "version": version, "model_key": candidate_model_key, "model_sha256": model_sha,
            "archive_key": archive_key, "archive_sha256": archive.sha256, "archive_bytes": archive.size,
            "export_meta": {k: meta.get(k) for k in ("version", "sample_rate", "format") if k in meta},
        }  # fmt: skip

        # -- servers and production ------------------------------------------------------
        t = time.monotonic()
        backend.ensure_running()
        router.ensure_running()
        timings["servers"] = time.monotonic() - t
        state = read_serving_state(store)
        prod_rec = state.get("production")
        registered = {v.version for v in backend.versions()}
        if prod_rec and prod_rec["version"] not in registered:
            t = time.monotonic()
            backend.register(_fetch_archive(store, prod_rec, serving.model_name, tmp_path / "restore"))
            backend.set_default(prod_rec["version"])
            registered.add(prod_rec["version"])
            timings["restore_production"] = time.monotonic() - t
        if not prod_rec:
            adopted = backend.default_version()
            if adopted:
                prod_rec = {"version": adopted, "archive_key": None, "sha256": None, "since": _now(), "adopted": True}
        production = prod_rec["version"] if prod_rec else None
        record["production"] = prod_rec

        if production == version:
            record.update(outcome=PROMOTED, reason="already_in_production")
            uri = write_record()
            return _summary(record, uri, archive_key, store)

        if version in registered:  # left over from an interrupted deploy: start clean
            _ensure_weights(router, {production: 100.0} if production else {})
            backend.unregister(version)

        # -- cold start --------------------------------------------------------------------
        if production is None:
            t = time.monotonic()
            try:
                backend.register(archive)
                backend.set_default(version)
                router.set_weights({version: 100.0})
                timings["register_candidate"] = time.monotonic() - t
                if on_promote is not None:
                    on_promote(version)
            except Exception as exc:
                _best_effort(record, "revert cold start", lambda: _revert_cold_start(backend, router, version))
                record.update(outcome=ROLLED_BACK, reason=f"cold start reverted: {type(exc).__name__}: {exc}")
                write_record()
                raise DeployError(f"cold start of {version} failed and was reverted: {type(exc).__name__}: {exc}") from exc
            _record_promotion(store, state, archive, archive_key, ctx.run_id, previous=None)
            record.update(outcome=PROMOTED, reason="cold_start", default_version=version)
            uri = write_record()
            return _summary(record, uri, archive_key, store)

        # -- canary ------------------------------------------------------------------------
        utts = load_replay_set(store, cfg.golden_version or ctx.config.demo.golden_version, cfg.replay_utterances, cfg.seed)
        _ensure_weights(router, {production: 100.0})
        try:
            t = time.monotonic()
            backend.register(archive)
            timings["register_candidate"] = time.monotonic() - t
            t = time.monotonic()
            outcome, reason, steps = _canary(backend, router, utts, production, version, cfg)
            timings["canary"] = time.monotonic() - t
        except BaseException as exc:  # incl. KeyboardInterrupt: never leave a canary taking traffic
            _best_effort(record, "abort canary", lambda: _abort(backend, router, production, version, serving.response_timeout_s))
            record.update(outcome=ROLLED_BACK, reason=f"error: {type(exc).__name__}: {exc}")
            write_record()
            raise
        record["steps"] = steps

        if outcome == ROLLED_BACK:
            t = time.monotonic()
            _abort(backend, router, production, version, serving.response_timeout_s)
            timings["rollback"] = time.monotonic() - t
            state.setdefault("history", []).append(
                {"time": _now(), "action": "canary", "version": version, "outcome": ROLLED_BACK, "run_id": ctx.run_id, "reason": reason}
            )
            _write_serving_state(store, state)
            record.update(outcome=ROLLED_BACK, reason=reason, default_version=production)
            uri = write_record()
            return _summary(record, uri, archive_key, store)

        # -- promotion -------------------------------------------------------------------
        t = time.monotonic()
        try:
            router.set_weights({version: 100.0})
            backend.set_default(version)
            if on_promote is not None:
                on_promote(version)
        except Exception as exc:
            _best_effort(record, "revert promotion", lambda: _revert_promotion(backend, router, production, version))
            record.update(outcome=ROLLED_BACK, reason=f"promotion reverted: {type(exc).__name__}: {exc}", default_version=production)
            write_record()
            raise DeployError(
                f"promoting {version} failed and serving was switched back to {production}: {type(exc).__name__}: {exc}"
            ) from exc
        _record_promotion(store, state, archive, archive_key, ctx.run_id, previous=prod_rec)
        timings["promote"] = time.monotonic() - t
        record.update(outcome=PROMOTED, reason=reason, default_version=version, promoted_at=_now())
        # requests still in flight to the old version finish (router drain), then the grace period
        record["old_version_drained"] = _retire(backend, router, production, serving.response_timeout_s, cfg.grace_period_s)
        record["unregistered"] = production
        uri = write_record()
        return _summary(record, uri, archive_key, store)


def _canary(
    backend: ServingBackend,
    router: Router,
    utts: list[ReplayUtterance],
    production: str,
    candidate: str,
    cfg: CanaryConfig,
) -> tuple[str, str, list[dict[str, Any]]]:
    offset = [0]

    def apply_weight(weight: float) -> None:
        router.set_weights({candidate: 100.0} if weight >= 100 else {production: 100.0 - weight, candidate: weight})

    def measure(weight: float, index: int) -> dict[str, Any]:
        started = time.monotonic()
        mark = router.log_mark()
        before = _safe_counters(backend)
        workers_before = _safe_version(backend, candidate)
        replies = replay_interval(router, utts, production=production, candidate=candidate, offset=offset[0], cfg=cfg)
        offset[0] += cfg.window_requests + cfg.paired_requests
        routed = _router_log(router, mark, expected=sum(1 for r in replies if r.status))
        after = _safe_counters(backend)
        prod = version_stats(production, replies, routed, after.get(production, VersionCounters()).minus(before.get(production)) if after else None)
        cand = version_stats(candidate, replies, routed, after.get(candidate, VersionCounters()).minus(before.get(candidate)) if after else None)
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

    return run_steps(cfg, apply_weight, measure)


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


def _retire(backend: ServingBackend, router: Router, version: str, drain_s: float, grace_s: float = 0.0) -> bool:
    """Unregister a version that no longer gets traffic, once the router has drained its requests."""
    drained = router.wait_drained(drain_s)
    if grace_s > 0:
        time.sleep(grace_s)
    backend.unregister(version)
    return drained


def _abort(backend: ServingBackend, router: Router, production: str, candidate: str, drain_s: float = 60.0) -> None:
    """Weight back to 0, in-flight requests drained, the candidate unregistered; production untouched."""
    router.set_weights({production: 100.0})
    _retire(backend, router, candidate, drain_s)


def _best_effort(record: dict[str, Any], what: str, fn: Callable[[], None]) -> None:
    """Run a clean-up step; a failure is recorded (and must not hide the error being handled)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        record.setdefault("cleanup_errors", []).append(f"{what}: {type(exc).__name__}: {exc}")


def _revert_promotion(backend: ServingBackend, router: Router, production: str, candidate: str) -> None:
    router.set_weights({production: 100.0})
    backend.set_default(production)
    _retire(backend, router, candidate, 60.0)


def _revert_cold_start(backend: ServingBackend, router: Router, candidate: str) -> None:
    router.set_weights({})
    _retire(backend, router, candidate, 60.0)


def _record_promotion(store: ObjectStore, state: dict[str, Any], archive: ModelArchive, run_archive_key: str,
                      run_id: str, previous: dict[str, Any] | None) -> None:  # fmt: skip
    key = join(ARCHIVE_PREFIX, archive.file_name)
    store.upload_file(key, archive.path)
    state["previous"] = previous if previous and previous.get("archive_key") else None
    state["production"] = _archive_record(archive, key, run_id=run_id, run_archive_key=run_archive_key)
    state.setdefault("history", []).append(
        {"time": _now(), "action": "promote", "version": archive.version, "outcome": PROMOTED, "run_id": run_id}
    )
    _write_serving_state(store, state)
    _prune_archives(store, state)


def _summary(record: dict[str, Any], uri: str, archive_key: str, store: ObjectStore) -> dict[str, Any]:
    return {
        "outcome": record["outcome"],
        "reason": record["reason"],
        "version": record["candidate"]["version"],
        "production_version": (record.get("production") or {}).get("version"),
        "default_version": record.get("default_version"),
        "canary_json": uri,
        "archive": store.uri(archive_key),
        "archive_sha256": record["candidate"]["archive_sha256"],
        "steps": [
            {"weight": s["weight"], "result": s.get("result"), "intervals": len(s["intervals"])} for s in record.get("steps", [])
        ],
        "duration_s": record.get("duration_s"),
    }


# --------------------------------------------------------------------------------------
# rollback


def rollback_serving(
    ctx: Any,
    *,
    to_version: str | None = None,
    on_restore: Callable[[str], None] | None = None,
    backend: ServingBackend | None = None,
    router: Router | None = None,
    grace_period_s: float | None = None,
    serving: ServingConfig | None = None,
    canary: CanaryConfig | None = None,
) -> dict[str, Any]:
    """Restore the previous production version in serving (TorchServe + router).

    Re-registers the kept archive (checksum verified) if needed, routes 100 % to it, makes it
    the default, records it in ``state/serving/state.json`` (the replaced version becomes
    ``previous``, so its archive stays available), calls ``on_restore(version)`` (e.g. the
    MLflow alias move back), then unregisters the replaced version after the grace period.
    ``to_version`` must be the recorded previous version (the only other archive kept).
    """
    serving, cfg, store = serving or serving_config(ctx.config), canary or canary_config(ctx.config), ctx.store
    if backend is None or router is None:
        b, r = open_services(serving)
        backend, router = backend or b, router or r
    grace = cfg.grace_period_s if grace_period_s is None else grace_period_s
    with _serving_lock(serving), tempfile.TemporaryDirectory(prefix="asr-rollback-") as tmp:
        state = read_serving_state(store)
        current, previous = state.get("production"), state.get("previous")
        if to_version and current and to_version == current["version"]:
            return {"outcome": "noop", "reason": f"{to_version} is already production", "version": to_version}
        if not previous:
            raise DeployError("no previous version recorded in state/serving/state.json: nothing to roll back to")
        if to_version and to_version != previous["version"]:
            raise DeployError(f"can only roll back to the previous version {previous['version']}, not {to_version}")
        target = previous["version"]
        backend.ensure_running()
        router.ensure_running()
        if not backend.has_version(target):
            backend.register(_fetch_archive(store, previous, serving.model_name, Path(tmp)))
        router.set_weights({target: 100.0})
        backend.set_default(target)
        replaced = current["version"] if current else None
        state["production"] = {**previous, "since": _now(), "restored": True}
        state["previous"] = current
        state.setdefault("history", []).append(
            {"time": _now(), "action": "rollback", "version": target, "replaced": replaced, "run_id": ctx.run_id}
        )
        _write_serving_state(store, state)
        if on_restore is not None:
            try:
                on_restore(target)
            except Exception as exc:
                raise DeployError(
                    f"serving was rolled back to {target} (TorchServe default, router 100 %, state updated) but "
                    f"on_restore failed: {type(exc).__name__}: {exc}; move the registry alias by hand"
                ) from exc
        if replaced and replaced != target:
            _retire(backend, router, replaced, serving.response_timeout_s, grace)
        return {"outcome": "restored", "version": target, "replaced": replaced, "default_version": backend.default_version()}


def deploy_registered(ctx: Any, *, force: bool = False) -> dict[str, Any]:
    """Stage ``deploy`` of the weekly run: canary the version this run registered; on a healthy
    canary, move MLflow alias ``production`` to it (recorded, with the canary as the reason)."""
    from pipeline.stages.register import promote

    if not ctx.is_complete("register"):
        raise DeployError(f"run {ctx.run_id!r} registered no model: run the register stage first")
    version = str(ctx.summary("register")["version"])

    def on_promote(v: str) -> None:
        promote(ctx, v, reason=f"canary healthy in run {ctx.run_id}", actor="canary")

    return deploy(
        ctx,
        candidate_model_key=ctx.stage_key("train", "model.pt"),
        version=version,
        on_promote=on_promote,
        force=force,
    )
