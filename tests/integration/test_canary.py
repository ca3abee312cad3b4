"""Canary deployment against real TorchServe and nginx on 127.0.0.1.

One TorchServe (1 worker per version, tiny random-weight models) and one nginx serve the
whole module. Scenarios: cold start, a good candidate promoted, a candidate that fails on
some inputs and a much slower one rolled back while production keeps serving, token
refusal, hostile requests, and the serving rollback.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from pipeline.canary import PROMOTED, ROLLED_BACK, DeployError, deploy, open_router, read_serving_state, rollback_serving
from pipeline.config import Config, FeatureConfig, ModelConfig
from pipeline.export import export_model
from pipeline.frontend import frontend_settings
from pipeline.manifest import Utterance, write_manifest
from pipeline.model import ASRModel
from pipeline.run import RunContext
from pipeline.serving.archive import ArchiveError, ModelArchive, build_archive
from pipeline.serving.config import CanaryConfig, ServingConfig
from pipeline.serving.router import ROUTED_VERSION_HEADER, find_nginx
from pipeline.serving.torchserve import TorchServe
from pipeline.storage import LocalStore
from pipeline.vocab import vocab_size
from wavfactory import make_audio

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

GOLDEN = "t1"
DURATIONS = (0.6, 1.0, 1.9, 2.6)  # half the replayed utterances are longer than FAIL_ABOVE_S
FAIL_ABOVE_S = 1.5
MODEL_KEY = "models/base/model.pt"


@dataclass
class Env:
    root: Path
    store: LocalStore
    serving: ServingConfig
    canary: CanaryConfig
    backend: TorchServe
    router: object
    model_path: Path
    promoted: list


def _write_golden(store: LocalStore, n: int = 24) -> None:
    utts = []
    words = ["one two", "three", "four five six", "seven eight"]
    for i in range(n):
        audio = make_audio(DURATIONS[i % len(DURATIONS)], 8000 if i % 3 else 16000, 1 + (i % 2), seed=100 + i)
        rel = f"audio/utt-{i:03d}.wav"
        store.put_bytes(f"golden/{GOLDEN}/{rel}", audio)
        utts.append(Utterance(rel, DURATIONS[i % len(DURATIONS)], words[i % len(words)], "spk", "test", f"utt-{i:03d}",
                              hashlib.sha256(audio).hexdigest()))  # fmt: skip
    write_manifest(store, f"golden/{GOLDEN}/manifest.jsonl", utts)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    try:
        find_nginx("nginx")
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{exc}")
    root = tmp_path_factory.mktemp("canary")
    store = LocalStore(root / "store")
    _write_golden(store)
    torch.manual_seed(0)
    model_path = root / "model.pt"
    export_model(ASRModel(ModelConfig(d_model=64, num_layers=1), 40, vocab_size()), frontend_settings(FeatureConfig(), 8000),
                 model_path, {"version": "x"})  # fmt: skip
    store.upload_file(MODEL_KEY, model_path)
    serving = ServingConfig(work_dir=str(root / "srv"), workers=1, batch_size=4, max_batch_delay_ms=5, max_duration_s=10.0,
                            max_audio_bytes=2 * 1024 * 1024, response_timeout_s=30)  # fmt: skip
    canary = CanaryConfig(
        steps=[5, 50, 100], window_s=15, window_requests=24, paired_requests=8, concurrency=4, min_canary_requests=4,
        max_consecutive_failures=2, grace_period_s=0.5, golden_version=GOLDEN, replay_utterances=24,
        max_latency_ratio=1.5, latency_slack_ms=20, max_error_rate=0.01,
    )  # fmt: skip
    backend = TorchServe(serving)
    router = open_router(serving, backend)
    t = time.monotonic()
    backend.ensure_running()
    router.ensure_running()
    print(f"servers up in {time.monotonic() - t:.1f} s")
    yield Env(root, store, serving, canary, backend, router, model_path, [])
    router.stop()
    backend.stop()
    assert not backend.healthy()


def _ctx(env: Env, run_id: str) -> RunContext:
    return RunContext(run_id=run_id, config=Config(), store=env.store)


def _deploy(env: Env, run_id: str, version: str, **kw):
    t = time.monotonic()
    summary = deploy(_ctx(env, run_id), candidate_model_key=MODEL_KEY, version=version, on_promote=env.promoted.append,
                     backend=env.backend, router=env.router, serving=env.serving, canary=env.canary, **kw)  # fmt: skip
    record = json.loads(env.store.get_text(f"runs/{run_id}/deploy/canary.json"))
    print(f"deploy {version}: {summary['outcome']} ({summary['reason']}) in {time.monotonic() - t:.1f} s")
    return summary, record


class Traffic:
    """Clients sending replayed audio through the router's split for as long as the block runs."""

    def __init__(self, router, clients: int = 2):
        self.url, self.headers = router.target()
        self.clients = clients
        self.results: list[tuple[str | None, int, str]] = []  # (routed version, status, error)
        self._stop = threading.Event()
        self._audio = [make_audio(d, 8000, seed=7 + i) for i, d in enumerate(DURATIONS)]

    def _run(self, k: int) -> None:
        session = requests.Session()
        i = k
        while not self._stop.is_set():
            audio = self._audio[i % len(self._audio)]
            i += 1
            try:
                r = session.post(self.url, data=audio, headers={**self.headers, "Content-Type": "audio/wav"}, timeout=30)
                self.results.append((r.headers.get(ROUTED_VERSION_HEADER), r.status_code, "" if r.ok else r.text[:200]))
            except requests.RequestException as exc:
                self.results.append((None, 0, f"{type(exc).__name__}: {exc}"))
            time.sleep(0.02)

    def __enter__(self):
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


@pytest.fixture(scope="module")
def production(env):
    """Cold start with version 1, then a good candidate (same weights) as version 2: promoted."""
    summary, record = _deploy(env, "run-1", "1")
    assert summary["outcome"] == PROMOTED and summary["reason"] == "cold_start"
    assert env.backend.default_version() == "1" and env.router.weights() == {"1": 100.0}
    with Traffic(env.router) as traffic:
        summary, record = _deploy(env, "run-2", "2")
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
        summary, record = _deploy(env, f"run-{name}", version, handler_options=options)
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


def test_requests_without_the_token_are_refused(env, production):
    audio = make_audio(1.0)
    base = env.backend.inference_url
    no_token = requests.post(f"{base}/predictions/asr", data=audio, headers={"Content-Type": "audio/wav"}, timeout=10)
    wrong = requests.post(f"{base}/predictions/asr/2", data=audio,
                          headers={"Content-Type": "audio/wav", "Authorization": "Bearer not-the-key"}, timeout=10)  # fmt: skip
    manage = requests.get(f"{env.backend.management_url}/models", timeout=10)
    for r in (no_token, wrong, manage):
        assert r.status_code in (400, 401, 403) and "Token Authorization failed" in r.text
    ok = env.backend.predict(audio, version="2")
    assert ok.status_code == 200 and ok.json()["model_version"] == "2"
    # the router holds the token: clients of the router need none
    url, headers = env.router.target()
    assert "Authorization" not in headers
    assert requests.post(url, data=audio, headers={"Content-Type": "audio/wav"}, timeout=10).status_code == 200


def _nan_wav() -> bytes:
    x = np.zeros((8000, 1), dtype=np.float32)
    x[10] = np.nan
    buf = io.BytesIO()
    sf.write(buf, x, 8000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


HOSTILE = [
    ("empty body", b"", "audio/wav"),
    ("non-audio bytes", bytes(range(256)) * 16, "audio/wav"),
    ("truncated wav", make_audio(2.0)[:3000], "audio/wav"),
    ("nan samples", _nan_wav(), "audio/wav"),
    ("too long", make_audio(12.0, 8000), "audio/wav"),
    ("wrong content type", make_audio(1.0), "text/plain"),
    ("json content type", b'{"audio": "x"}', "application/json"),
    ("form-urlencoded binary", make_audio(1.0), "application/x-www-form-urlencoded"),
    ("too many bytes", b"RIFF" + bytes(3 * 1024 * 1024), "audio/wav"),
]


@pytest.mark.parametrize("path", ["router", "direct"])
def test_hostile_requests_get_4xx_and_the_server_keeps_serving(env, production, path):
    if path == "router":
        url, headers = env.router.target("2")
    else:
        url = env.backend.inference_url + env.backend.prediction_path("2")
        headers = {"Authorization": f"Bearer {env.backend.keys()['inference']}"}
    for name, body, ctype in HOSTILE:
        if path == "direct" and name == "form-urlencoded binary":
            continue  # TorchServe's own form decoder answers 500 here: the router refuses it before (documented)
        r = requests.post(url, data=body, headers={**headers, "Content-Type": ctype}, timeout=30)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        if r.content:
            message = r.json()
            assert message.get("message"), (name, message)
    workers = {v.version: (v.workers, v.ready_workers) for v in env.backend.versions()}
    assert workers == {"2": (1, 1)}
    r = requests.post(url, data=make_audio(1.0), headers={**headers, "Content-Type": "audio/wav"}, timeout=30)
    assert r.status_code == 200 and r.json()["model_version"] == "2"


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
        deploy(_ctx(env, "run-hook"), candidate_model_key=MODEL_KEY, version="3", on_promote=broken_hook,
               backend=env.backend, router=env.router, serving=env.serving, canary=env.canary)  # fmt: skip
    record = json.loads(env.store.get_text("runs/run-hook/deploy/canary.json"))
    assert record["outcome"] == ROLLED_BACK and "promotion reverted" in record["reason"]
    assert not _ctx(env, "run-hook").is_complete("deploy")  # a retry canaries again
    assert env.backend.default_version() == "2" and [v.version for v in env.backend.versions()] == ["2"]
    assert env.router.weights() == {"2": 100.0}
    assert read_serving_state(env.store)["production"]["version"] == "2"


def test_rollback_restores_the_previous_version(env, production):
    # a restart loses TorchServe's registrations: the kept archive is re-registered (checksum verified)
    result = rollback_serving(_ctx(env, "run-rollback"), backend=env.backend, router=env.router, grace_period_s=0.2,
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
    summary, record = _deploy(env, "run-restart", "1")
    assert summary["outcome"] == PROMOTED and summary["reason"] == "already_in_production"
    assert env.backend.default_version() == "1"
    url, headers = env.router.target()
    r = requests.post(url, data=make_audio(1.0), headers={**headers, "Content-Type": "audio/wav"}, timeout=30)
    assert r.status_code == 200 and r.json()["model_version"] == "1"
