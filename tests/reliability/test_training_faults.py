"""Reliability scenario 2 (full training): a lost DDP worker, a hung one, and a driver that dies mid-stage.

A small real pipeline run (demo corpus, ingest, features) trains with 2 gloo DDP workers
through Ray Train. A worker SIGKILLed mid-epoch is replaced and training continues from
the last checkpoint (``FailureConfig``); a worker frozen with SIGSTOP is declared dead
after ``train.hang_timeout_s`` and replaced the same way; a driver killed with its whole
process group is followed by a retried stage that resumes from the checkpoints in the
run's work area.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from support.work_area import registered_checkpoints, train_checkpoints

from pipeline.config import Config, DemoConfig, TrainConfig
from pipeline.demo.corpus import build_demo_corpus
from pipeline.run import RunContext
from pipeline.stages.features import extract_features
from pipeline.stages.ingest.stage import ingest
from pipeline.storage import open_store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RUN = "train-faults"
EPOCHS = 5


def _config(max_failures: int, hang_timeout_s: int = 600) -> Config:
    return Config(
        demo=DemoConfig(weeks=1, utterances_per_week=120, golden_utterances=8, max_digits=3),
        train=TrainConfig(epochs=EPOCHS, batch_size=8, num_workers=2, max_failures=max_failures, warmup_steps=5,
                          hang_timeout_s=hang_timeout_s),  # fmt: skip
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A store with the run's features extracted; each test trains on its own copy."""
    root = tmp_path_factory.mktemp("train-faults-base")
    config = _config(0)
    store = open_store(str(root))
    build_demo_corpus(store, config.demo, config.audio.sample_rate, progress=False)
    ctx = RunContext(run_id=RUN, config=config, store=store)
    ingest(ctx, progress=False)
    extract_features(ctx, progress=False)
    return root


def _copy(prepared: Path, tmp_path: Path, max_failures: int, **kw) -> RunContext:
    root = tmp_path / "store"
    shutil.copytree(prepared, root)
    return RunContext(run_id=RUN, config=_config(max_failures, **kw), store=open_store(str(root)))


def _train_workers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmd and p.pid != os.getpid():
            out.append(p)
    return out


def _train_with_a_signalled_worker(ctx: RunContext, sig: int) -> tuple[dict, dict, float]:
    """Run the train stage; once 2 checkpoints are registered, send ``sig`` to one of its DDP workers.

    Returns the stage's summary, what was signalled (pid, checkpoints registered and written,
    when) and when training finished (monotonic).
    """
    from pipeline.stages.train import train_full

    hit: dict = {}

    def watch():
        deadline = time.time() + 600
        while time.time() < deadline and not hit:
            registered = registered_checkpoints(ctx)
            workers = _train_workers()
            if registered >= 2 and len(workers) >= 2:
                victim = workers[-1]
                hit.update(pid=victim.pid, registered=registered, written=len(train_checkpoints(ctx)), at=time.monotonic())
                victim.send_signal(sig)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = train_full(ctx)
        return summary, hit, time.monotonic()
    finally:
        watcher.join(5)
        if hit:  # a worker still stopped would outlive the test (a dead one's pid may be reused: check)
            with contextlib.suppress(psutil.Error):
                victim = psutil.Process(hit["pid"])
                if victim.status() == psutil.STATUS_STOPPED:
                    victim.kill()
        import ray

        ray.shutdown()


@pytest.mark.scenario(2, expected="a DDP worker SIGKILLed mid-training is replaced; training resumes from the last "
                                   "registered checkpoint (not from scratch) and completes every epoch")
def test_lost_training_worker_resumes_from_the_last_checkpoint(prepared, tmp_path, observe):
    ctx = _copy(prepared, tmp_path, max_failures=2)
    summary, killed, _ = _train_with_a_signalled_worker(ctx, signal.SIGKILL)  # the spot node under one rank vanishes
    assert killed, "no training worker was killed"
    history = json.loads(ctx.store.get_text(f"runs/{RUN}/train/history.json"))
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert summary["epochs"] == EPOCHS and summary["skipped"] is False
    # one restart, from the last checkpoint the controller had registered (or a later one); every
    # epoch's checkpoint stays in the work area, so the epochs trained twice are those beyond EPOCHS
    assert len(summary["resumed_from"]) == 1, summary["resumed_from"]
    resumed = summary["resumed_from"][0]
    redone = len(train_checkpoints(ctx)) - EPOCHS
    assert killed["registered"] <= resumed <= killed["written"]
    assert redone == killed["written"] - resumed
    assert ctx.store.exists(f"runs/{RUN}/train/model.pt") and ctx.is_complete("train")
    observe(f"killed worker pid {killed['pid']} with {killed['written']} epoch checkpoint(s) written, "
            f"{killed['registered']} registered by the controller; "
            f"restarted from epoch {resumed}; {redone} finished epoch(s) trained again plus the one in flight; "
            f"{len(history)}/{EPOCHS} epochs in history")


HANG_TIMEOUT_S = 20


@pytest.mark.slow
@pytest.mark.scenario(2, expected="a DDP worker that hangs (SIGSTOP: a frozen node) is declared dead after "
                                   "train.hang_timeout_s; training restarts from the last registered checkpoint "
                                   "and completes, instead of waiting forever")
def test_hung_training_worker_is_replaced_after_the_hang_timeout(prepared, tmp_path, observe):
    ctx = _copy(prepared, tmp_path, max_failures=2, hang_timeout_s=HANG_TIMEOUT_S)
    # SIGSTOP: alive but answering nothing, a hung node
    summary, frozen, finished = _train_with_a_signalled_worker(ctx, signal.SIGSTOP)
    assert frozen, "no training worker was frozen"
    history = json.loads(ctx.store.get_text(f"runs/{RUN}/train/history.json"))
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert len(summary["resumed_from"]) == 1 and summary["resumed_from"][0] >= frozen["registered"], summary
    recovered_in = finished - frozen["at"]
    assert recovered_in >= HANG_TIMEOUT_S * 0.9  # it was the timeout that freed it, not a crash
    observe(f"worker pid {frozen['pid']} SIGSTOPped with {frozen['registered']} checkpoints registered; hang "
            f"timeout {HANG_TIMEOUT_S} s; restarted from epoch {summary['resumed_from'][0]}, {len(history)}/{EPOCHS} "
            f"epochs, done {recovered_in:.0f} s after the freeze")


_DRIVER = textwrap.dedent(
    """
    import json, sys
    from pipeline.config import Config
    from pipeline.run import RunContext
    from pipeline.storage import open_store
    from pipeline.stages.train import train_full
    config = Config.model_validate(json.loads(sys.argv[1]))
    train_full(RunContext(run_id=sys.argv[3], config=config, store=open_store(sys.argv[2])))
    """
)


@pytest.mark.slow
@pytest.mark.scenario(2, expected="the training driver's machine dies mid-stage; the retried stage resumes from the "
                                   "last checkpoint in the run's work area instead of starting over")
def test_crashed_training_driver_retry_resumes(prepared, tmp_path, observe):
    from pipeline.stages.train import train_full

    ctx = _copy(prepared, tmp_path, max_failures=0)
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, ctx.config.model_dump_json(), ctx.store.root, RUN],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and registered_checkpoints(ctx) < 2:
            assert driver.poll() is None, "the driver ended before it could be crashed"
            time.sleep(0.05)
        at_kill = registered_checkpoints(ctx)
        assert at_kill >= 2, "no checkpoint registered before the deadline"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's machine dies, with its local Ray
        driver.wait(30)
    time.sleep(1)
    for p in _train_workers():  # workers of the dead driver's Ray, if any outlived the group
        p.kill()
    assert not ctx.is_complete("train") and not ctx.store.exists(f"runs/{RUN}/train/model.pt")

    try:
        summary = train_full(ctx)  # the retried stage
    finally:
        import ray

        ray.shutdown()
    history = json.loads(ctx.store.get_text(f"runs/{RUN}/train/history.json"))
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert summary["resumed_from"] and summary["resumed_from"][0] >= at_kill, summary["resumed_from"]
    observe(f"driver killed with {at_kill} epoch checkpoints registered; the retried stage resumed from epoch "
            f"{summary['resumed_from'][0]} and finished {len(history)}/{EPOCHS} epochs")
