"""Reliability scenarios 5 and 6 (serving) against real TorchServe and nginx on 127.0.0.1.

One TorchServe and one nginx for the module (tests/support/serving_env.py); production is version
"1", put there by a cold start (no canary: cheaper than test_canary's promoted version 2).

6. Hostile requests get a 4xx with a message, through the router and straight to TorchServe,
   while good requests keep getting 200 and no worker is lost.
5. The candidate's TorchServe worker is SIGKILLed again and again during the canary: the
   canary rolls it back; production, the router and the serving state are untouched and
   production's clients see only 200s.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest
import requests
import soundfile as sf
from support.serving_env import MAX_AUDIO_BYTES, Traffic, deploy_version, env_fixture
from support.wavfactory import make_audio

from pipeline.serving.state import PROMOTED, ROLLED_BACK, read_serving_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PRODUCTION = "1"


env = env_fixture("serving-faults")


@pytest.fixture(scope="module")
def production(env):
    summary, _ = deploy_version(env, "run-prod", PRODUCTION)
    assert summary["outcome"] == PROMOTED and summary["reason"] == "cold_start"
    assert env.backend.default_version() == PRODUCTION and env.router.weights() == {PRODUCTION: 100.0}
    return PRODUCTION


def describe_workers(backend, version: str) -> list[dict]:
    """TorchServe's describe-model workers (id, pid, status) of one version; [] when it is not registered."""
    r = requests.get(f"{backend.management_url}/models/{backend.model_name}/{version}",
                     headers={"Authorization": f"Bearer {backend.keys()['management']}"}, timeout=10)  # fmt: skip
    if r.status_code == 404:
        return []
    r.raise_for_status()
    return [w for m in r.json() for w in m.get("workers") or []]


def ready_worker_pids(backend, version: str) -> set[int]:
    workers = describe_workers(backend, version)
    return {int(w["pid"]) for w in workers if w.get("status") == "READY" and int(w.get("pid") or -1) > 0}


# --------------------------------------------------------------------------------------
# scenario 6: hostile requests


def _nan_wav() -> bytes:
    x = np.zeros((8000, 1), dtype=np.float32)
    x[10] = np.nan
    buf = io.BytesIO()
    sf.write(buf, x, 8000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _chunked_huge():
    """3.9 MB sent with Transfer-Encoding: chunked (no Content-Length to refuse it by)."""
    for _ in range(60):
        yield b"RIFF" + bytes(64 * 1024)


TEN_MINUTES_WAV = make_audio(600.0, 8000)  # 9.6 MB: over the size limit
TEN_MINUTES_FLAC = make_audio(samples=np.zeros((600 * 8000, 1), dtype=np.float32), sr=8000, fmt="FLAC")  # ~14 KB: too long
assert len(TEN_MINUTES_WAV) > MAX_AUDIO_BYTES > 100 * len(TEN_MINUTES_FLAC)

# (name, body or a function returning one, content type, header overrides for the direct path)
HOSTILE = [
    ("empty body", b"", "audio/wav", {}),
    ("non-audio bytes", bytes(range(256)) * 16, "audio/wav", {}),
    ("truncated wav", make_audio(2.0)[:3000], "audio/wav", {}),
    ("nan samples", _nan_wav(), "audio/wav", {}),
    ("12 s (over max_duration_s)", make_audio(12.0, 8000), "audio/wav", {}),
    ("10-minute wav (9.6 MB)", TEN_MINUTES_WAV, "audio/wav", {}),
    ("10-minute flac (14 KB)", TEN_MINUTES_FLAC, "audio/flac", {}),
    ("too many bytes (3 MB)", b"RIFF" + bytes(3 * 1024 * 1024), "audio/wav", {}),
    ("huge chunked body", _chunked_huge, "audio/wav", {}),
    ("wrong content type", make_audio(1.0), "text/plain", {}),
    ("json content type", b'{"audio": "x"}', "application/json", {}),
    ("form-urlencoded binary", make_audio(1.0), "application/x-www-form-urlencoded", {}),
    # the router holds the token (clients send none, and a client's own header is replaced): direct only
    ("missing token", make_audio(1.0), "audio/wav", {"Authorization": None}),
    ("wrong token", make_audio(1.0), "audio/wav", {"Authorization": "Bearer not-the-key"}),
]
TOKEN_KINDS = {"missing token", "wrong token"}
# TorchServe's own (Java) front end answers these before the handler runs, so without our JSON:
DIRECT_SIZE_LIMIT = {"10-minute wav (9.6 MB)", "too many bytes (3 MB)", "huge chunked body"}  # 413, empty body
DIRECT_FORM_DECODER = "form-urlencoded binary"  # 500 ErrorDataDecoderException; the router refuses it with 415


def _message(r: requests.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("message") if isinstance(body, dict) else None


@pytest.mark.scenario(6, expected="every hostile request (empty, huge, chunked huge, non-audio, truncated, 10-minute audio, "
                                  "NaN, wrong content type, missing/wrong token) gets a 4xx with a message through the router "
                                  "and directly; good requests keep getting 200 throughout; no worker is lost")  # fmt: skip
def test_hostile_requests_get_4xx_and_the_server_keeps_serving(env, production, observe):
    paths = {
        "router": env.router.target(production),
        "direct": (env.backend.inference_url + env.backend.prediction_path(production),
                   {"Authorization": f"Bearer {env.backend.keys()['inference']}"}),
    }  # fmt: skip
    pids_before = ready_worker_pids(env.backend, production)
    good = make_audio(1.0, seed=3)
    refused: Counter = Counter()
    interleaved: list[int] = []
    exceptions: list[str] = []
    with Traffic(env.router, clients=2) as traffic:
        for path, (url, base_headers) in paths.items():
            for name, body, ctype, overrides in HOSTILE:
                if path == "router" and name in TOKEN_KINDS:
                    continue
                headers = {**base_headers, "Content-Type": ctype, **overrides}
                headers = {k: v for k, v in headers.items() if v is not None}
                r = requests.post(url, data=body() if callable(body) else body, headers=headers, timeout=30)
                if path == "direct" and name == DIRECT_FORM_DECODER:
                    assert r.status_code == 500 and "ErrorDataDecoderException" in r.text, (r.status_code, r.text[:300])
                    exceptions.append(f"direct '{name}': TorchServe's form decoder answers 500 (router: 415)")
                else:
                    assert 400 <= r.status_code < 500, (path, name, r.status_code, r.text[:300])
                    if path == "direct" and name in DIRECT_SIZE_LIMIT:
                        assert r.status_code == 413, (name, r.status_code)
                    else:
                        assert _message(r), (path, name, r.status_code, r.text[:300])
                    if name in TOKEN_KINDS:
                        assert "Token Authorization failed" in r.text
                    refused[path] += 1
                # a good request right after every hostile one, on the same path
                ok = requests.post(url, data=good, headers={**base_headers, "Content-Type": "audio/wav"}, timeout=30)
                interleaved.append(ok.status_code)
                assert ok.status_code == 200 and ok.json()["model_version"] == production, (name, ok.text[:300])
        time.sleep(0.5)  # let the background clients overlap the last refusals
    assert traffic.results and not traffic.failures(), traffic.failures()[:5]
    workers = {v.version: (v.workers, v.ready_workers) for v in env.backend.versions()}
    assert workers == {production: (1, 1)}
    assert ready_worker_pids(env.backend, production) == pids_before  # no worker crashed or was restarted
    exceptions.append(f"direct size-limit refusals ({len(DIRECT_SIZE_LIMIT)}) are TorchServe's bare 413 without a body")
    observe(
        f"{refused['router']} hostile kinds via the router, {refused['direct']} directly: all 4xx "
        f"({refused['router'] + refused['direct'] - len(DIRECT_SIZE_LIMIT)} with a JSON message); "
        f"{len(interleaved)} interleaved + {len(traffic.results)} concurrent good requests, all 200; "
        f"worker pid unchanged, 1/1 ready; exceptions: {'; '.join(exceptions)}"
    )


@pytest.mark.scenario(6, expected="the management API refuses a missing or wrong token with a message; "
                                  "the router holds the token, so its clients need none and cannot override it")  # fmt: skip
def test_requests_without_the_token_are_refused(env, production, observe):
    audio = make_audio(1.0)
    base = env.backend.management_url
    refused = {
        "management, no token": requests.get(f"{base}/models", timeout=10),
        "management, wrong token": requests.get(
            f"{base}/models", headers={"Authorization": "Bearer not-the-key"}, timeout=10
        ),
        "management, inference token": requests.get(
            f"{base}/models", headers={"Authorization": f"Bearer {env.backend.keys()['inference']}"}, timeout=10
        ),
        "inference, no token": requests.post(f"{env.backend.inference_url}/predictions/asr", data=audio,
                                             headers={"Content-Type": "audio/wav"}, timeout=10),  # fmt: skip
    }
    for name, r in refused.items():
        assert r.status_code in (400, 401, 403), (name, r.status_code, r.text[:300])
        assert "Token Authorization failed" in (_message(r) or ""), (name, r.text[:300])
    ok = env.backend.predict(audio, version=production)
    assert ok.status_code == 200 and ok.json()["model_version"] == production
    url, headers = env.router.target()
    assert "Authorization" not in headers
    via_router = [
        requests.post(url, data=audio, headers={"Content-Type": "audio/wav", **extra}, timeout=10)
        for extra in ({}, {"Authorization": "Bearer not-the-key"})
    ]
    assert [r.status_code for r in via_router] == [200, 200]
    observe(f"{len(refused)} token-less/wrong-token calls refused ({sorted({r.status_code for r in refused.values()})}, "
            "'Token Authorization failed'); router clients with no or a wrong token: 200")  # fmt: skip


# --------------------------------------------------------------------------------------
# scenario 5: worker crash during the canary


class WorkerKiller:
    """SIGKILLs the READY workers of ``version`` (pids from TorchServe's describe-model) while the router
    gives it traffic, i.e. during the canary (not during registration), until the block ends."""

    def __init__(self, env, version: str, poll_s: float = 0.2):
        self.env, self.version, self.poll_s = env, version, poll_s
        self.kills: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.version in self.env.router.weights():
                    for pid in ready_worker_pids(self.env.backend, self.version) - {p for _, p in self.kills}:
                        try:
                            os.kill(pid, signal.SIGKILL)
                            self.kills.append((time.monotonic(), pid))
                        except ProcessLookupError:
                            pass
            except Exception as exc:  # noqa: BLE001 - e.g. the version being unregistered mid-call
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.mark.scenario(5, expected="candidate workers SIGKILLed repeatedly during the canary: the canary judges it "
                                  "unhealthy and rolls back; production stays TorchServe's default, the router "
                                  "100 % production, serving state unchanged; production's clients see only 200s")  # fmt: skip
def test_worker_crashes_during_the_canary_roll_it_back(env, production, observe):
    candidate = "crashing"
    state_before = read_serving_state(env.store)
    prod_pids = ready_worker_pids(env.backend, production)
    assert prod_pids
    t = time.monotonic()
    with Traffic(env.router) as traffic, WorkerKiller(env, candidate) as killer:
        summary, record = deploy_version(env, "run-crash", candidate)
    took = time.monotonic() - t
    intervals = [i for s in record.get("steps", []) for i in s["intervals"]]
    for i in intervals:
        print(f"interval {i['index']} at {i['weight']}%: passed={i['passed']} in {i['duration_s']} s, candidate "
              f"{i['candidate']['requests']} requests / {i['candidate']['errors']} errors {i['candidate']['sample_errors']}")

    assert len(killer.kills) >= 2, (killer.kills, killer.errors)  # killed, restarted by TorchServe, killed again
    assert not {p for _, p in killer.kills} & prod_pids  # only the candidate's workers were touched
    assert summary["outcome"] == ROLLED_BACK, (record.get("reason"), record.get("steps"))
    assert "consecutive failing intervals" in record["reason"], record["reason"]
    failing = [i for i in intervals if not i["passed"]]
    assert len(failing) >= env.canary.max_consecutive_failures
    def crash_seen(i):  # by the requests that hit it, or by the worker check (restarted / not ready)
        workers = next((c for c in i["checks"] if c["check"] == "candidate_workers"), None)
        return i["candidate"]["errors"] > 0 or (workers is not None and not workers["passed"])

    assert all(crash_seen(i) for i in failing[-env.canary.max_consecutive_failures:]), failing
    for i in intervals:  # production measured clean in the same windows
        assert i["production"]["errors"] == 0, i["production"]
    # production untouched, canary gone
    assert env.backend.default_version() == production
    assert [(v.version, v.workers, v.ready_workers) for v in env.backend.versions()] == [(production, 1, 1)]
    assert ready_worker_pids(env.backend, production) == prod_pids
    assert env.router.weights() == {production: 100.0}
    state_after = read_serving_state(env.store)
    assert (state_after["production"], state_after["previous"]) == (state_before["production"], state_before["previous"])
    assert state_after["history"][-1]["action"] == "canary" and state_after["history"][-1]["outcome"] == ROLLED_BACK
    prod_side = [s for v, s, _ in traffic.results if v == production]
    assert prod_side and all(s == 200 for s in prod_side), traffic.failures(production)[:5]
    assert all(v in (production, candidate) for v, _, _ in traffic.results), [r for r in traffic.results if r[0] is None][:5]

    samples = sorted({e for i in failing for e in i["candidate"]["sample_errors"]})
    observe(
        f"{len(killer.kills)} SIGKILLs of candidate workers ({len({p for _, p in killer.kills})} pids, TorchServe restarted "
        f"each); {record['outcome']} after {len(intervals)} intervals in {took:.0f} s: {record['reason']}; candidate "
        f"errors per failing interval {[i['candidate']['errors'] for i in failing]} ({'; '.join(samples)[:120]}), "
        f"worker restarts seen {[(i.get('workers') or {}).get('restarted') for i in failing]}; "
        f"production: {len(prod_side)} client requests all 200, still default, router 100 %, state unchanged, "
        "its worker pid unchanged"
    )
