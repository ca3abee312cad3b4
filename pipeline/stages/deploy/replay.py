"""The canary's replay client: held-out golden audio sent through the router's split and to both versions.

:func:`load_replay_set` takes a seeded sample of ``golden/{version}/``; :func:`replay_interval`
sends one analysis window of it: ``window_requests`` through the weighted route, with
``paired_requests`` utterances sent to **both** versions explicitly (the same audio, for WER),
from ``concurrency`` clients, for at most ``window_s`` seconds. Every answer is a :class:`Reply`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

from pipeline.config import CanaryConfig
from pipeline.data.manifest import read_manifest, resolve_audio_key
from pipeline.serving.router import PROBE_HEADER, ROUTED_VERSION_HEADER, Router
from pipeline.stages.deploy.errors import DeployError
from pipeline.storage import ObjectStore, join


@dataclass(frozen=True)
class ReplayUtterance:
    """One golden utterance to replay: its reference transcript and its audio bytes."""

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


def _send(
    session: requests.Session, url: str, headers: dict[str, str], utt: ReplayUtterance, timeout: float
) -> tuple[int, dict[str, Any] | None, str | None, float, str | None]:
    """One POST: ``(status, JSON body, routed version, latency, transport error)``; status 0 = no answer."""
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
