"""A real serving environment for tests: TorchServe + nginx on 127.0.0.1, a golden set, a tiny model.

Shared by tests/integration/test_canary.py and tests/reliability/test_serving_faults.py; each
module builds its own servers with a module-scoped fixture::

    env = env_fixture("canary")

One TorchServe (1 worker per version, a random-weight model of a few hundred KB) and one
nginx router; :func:`deploy_version` runs the real ``deploy`` stage against them, and
:class:`Traffic` keeps clients sending audio through the router while a block runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from pipeline.asr.export import export_model
from pipeline.asr.frontend import frontend_settings
from pipeline.asr.model import ASRModel
from pipeline.asr.vocab import vocab_size
from pipeline.config import CanaryConfig, Config, FeatureConfig, ModelConfig, ServingConfig
from pipeline.data.manifest import Utterance, write_manifest
from pipeline.run import RunContext
from pipeline.serving.nginx import find_nginx
from pipeline.serving.router import ROUTED_VERSION_HEADER
from pipeline.serving.service import open_router
from pipeline.serving.torchserve import TorchServe
from pipeline.stages.deploy.stage import deploy
from pipeline.storage import LocalStore
from support.wavfactory import make_audio

GOLDEN = "t1"
DURATIONS = (0.6, 1.0, 1.9, 2.6)  # half the replayed utterances are longer than FAIL_ABOVE_S
FAIL_ABOVE_S = 1.5
MODEL_KEY = "models/base/model.pt"
MAX_AUDIO_BYTES = 2 * 1024 * 1024
MAX_DURATION_S = 10.0


@dataclass
class Env:
    root: Path
    store: LocalStore
    serving: ServingConfig
    canary: CanaryConfig
    backend: TorchServe
    router: object
    model_path: Path
    promoted: list = field(default_factory=list)  # versions passed to on_promote, in order


def write_golden(store: LocalStore, n: int = 24) -> None:
    """A golden manifest of ``n`` seeded noise utterances (8 and 16 kHz, mono and stereo)."""
    utts = []
    words = ["one two", "three", "four five six", "seven eight"]
    for i in range(n):
        audio = make_audio(DURATIONS[i % len(DURATIONS)], 8000 if i % 3 else 16000, 1 + (i % 2), seed=100 + i)
        rel = f"audio/utt-{i:03d}.wav"
        store.put_bytes(f"golden/{GOLDEN}/{rel}", audio)
        utts.append(Utterance(rel, DURATIONS[i % len(DURATIONS)], words[i % len(words)], "spk", "test", f"utt-{i:03d}",
                              hashlib.sha256(audio).hexdigest()))  # fmt: skip
    write_manifest(store, f"golden/{GOLDEN}/manifest.jsonl", utts)


def default_canary(**overrides) -> CanaryConfig:
    """The canary settings of the serving tests: short windows, two failing intervals roll back."""
    settings = dict(
        steps=[5, 50, 100], window_s=15, window_requests=24, paired_requests=8, concurrency=4, min_canary_requests=4,
        max_consecutive_failures=2, grace_period_s=0.5, golden_version=GOLDEN, replay_utterances=24,
        max_latency_ratio=1.5, latency_slack_ms=20, max_error_rate=0.01,
    )  # fmt: skip
    settings.update(overrides)
    return CanaryConfig(**settings)


@contextlib.contextmanager
def running_env(root: Path, *, canary: CanaryConfig | None = None, **serving_overrides) -> Iterator[Env]:
    """Store, golden set, exported model, TorchServe and nginx under ``root``; both servers stopped on exit."""
    import torch

    try:
        find_nginx("nginx")
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{exc}")
    store = LocalStore(root / "store")
    write_golden(store)
    torch.manual_seed(0)
    model_path = root / "model.pt"
    export_model(ASRModel(ModelConfig(d_model=64, num_layers=1), 40, vocab_size()), frontend_settings(FeatureConfig(), 8000),
                 model_path, {"version": "x"})  # fmt: skip
    store.upload_file(MODEL_KEY, model_path)
    settings = dict(work_dir=str(root / "srv"), workers=1, batch_size=4, max_batch_delay_ms=5, max_duration_s=MAX_DURATION_S,
                    max_audio_bytes=MAX_AUDIO_BYTES, response_timeout_s=30)  # fmt: skip
    settings.update(serving_overrides)
    serving = ServingConfig(**settings)
    backend = TorchServe(serving)
    router = open_router(serving, backend)
    t = time.monotonic()
    try:
        backend.ensure_running()
        router.ensure_running()
        print(f"servers up in {time.monotonic() - t:.1f} s")
        yield Env(root, store, serving, canary or default_canary(), backend, router, model_path)
    finally:
        router.stop()
        backend.stop()
    assert not backend.healthy()


def env_fixture(name: str):
    """A module-scoped fixture ``env``: a running :class:`Env` under a temp folder named ``name``."""

    @pytest.fixture(scope="module")
    def env(tmp_path_factory) -> Iterator[Env]:
        with running_env(tmp_path_factory.mktemp(name)) as e:
            yield e

    return env


def make_ctx(env: Env, run_id: str) -> RunContext:
    return RunContext(run_id=run_id, config=Config(), store=env.store)


def deploy_version(env: Env, run_id: str, version: str, **kw) -> tuple[dict, dict]:
    """Run the deploy stage for the base model as ``version``: ``(summary, canary.json record)``."""
    t = time.monotonic()
    summary = deploy(make_ctx(env, run_id), candidate_model_key=MODEL_KEY, version=version, on_promote=env.promoted.append,
                     backend=env.backend, router=env.router, serving=env.serving, canary=env.canary, **kw)  # fmt: skip
    record = json.loads(env.store.get_text(f"runs/{run_id}/deploy/canary.json"))
    print(f"deploy {version}: {summary['outcome']} ({summary['reason']}) in {time.monotonic() - t:.1f} s")
    return summary, record


class Traffic:
    """Clients sending replayed audio through the router's split for as long as the block runs.

    ``results``: ``(routed version, status, error)`` per request; ``version`` sends every
    request to that explicit version instead of the split.
    """

    def __init__(self, router, clients: int = 2, version: str | None = None, pause_s: float = 0.02):
        self.url, self.headers = router.target(version)
        self.clients = clients
        self.pause_s = pause_s
        self.results: list[tuple[str | None, int, str]] = []
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
            time.sleep(self.pause_s)

    def __enter__(self):
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def failures(self, version: str | None = None) -> list[tuple[str | None, int, str]]:
        """Requests (answered by ``version``, or all) that did not get a 200."""
        return [r for r in self.results if r[1] != 200 and (version is None or r[0] == version)]
