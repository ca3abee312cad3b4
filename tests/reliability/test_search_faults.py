"""Reliability scenarios 1 and 2 (search): spot preemption of a trial, a crash of the search driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from support.run_factory import make_proxy_run
from support.work_area import trial_checkpoints, trial_results

pytestmark = pytest.mark.integration


@pytest.mark.scenario(1, expected="a trial's worker killed mid-run resumes from its last checkpoint (trials "
                                   "checkpoint at the rungs); the search finishes with no errored trial; work lost "
                                   "<= the epochs since the trial's last rung")
def test_preempted_trial_resumes_from_its_checkpoint(tmp_path, observe, monkeypatch):
    from pipeline.stages.search.stage import search

    # Tune's snapshots bring result.json to the work area, where the watcher reads what the driver has seen
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0.5")
    # no early stopping (fifo) so every trial runs 4 epochs and can be preempted mid-run; rungs at 1, 2 and 4
    ctx = make_proxy_run(tmp_path, "preempt", trials=2, max_epochs=4, grace_period=1, reduction_factor=2,
                         scheduler="fifo", max_failures=2)
    killed: dict = {}

    def preempt():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            for trial, rows in trial_results(ctx).items():
                # after rung 1 or 2 (the snapshot may bring both rows at once on a fast machine), before the end:
                # result.json lags the trial by up to a snapshot, its checkpoints (one per rung) do not
                rungs_done = trial_checkpoints(ctx, trial)
                if rows and rows[-1].get("pid") and rows[-1].get("epoch") in (1, 2) and rungs_done < 3:
                    killed.update(trial=trial, pid=rows[-1]["pid"], epoch=rows[-1]["epoch"], rungs_done=rungs_done)
                    os.kill(int(rows[-1]["pid"]), signal.SIGKILL)  # the spot node vanishes
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=preempt, daemon=True)
    watcher.start()
    try:
        summary = search(ctx, progress=False)
    finally:
        watcher.join(5)
        import ray

        ray.shutdown()
    assert killed, "no trial was preempted"
    board = json.loads(ctx.store.get_text("runs/preempt/search/leaderboard.json"))
    assert summary["statuses"]["error"] == 0 and len(board) == 2
    victim = next(r for r in board if r["trial_id"] and r["trial_id"] in os.path.basename(killed["trial"]))
    assert victim["status"] == "completed" and victim["epochs"] == 4
    # it restarted from a rung's checkpoint: the last one it wrote before the kill, or, if the driver had not yet
    # taken up that report, the one before, which the snapshot the watcher read already showed
    rungs = summary["rungs"]["rungs"]
    last_written = rungs[killed["rungs_done"] - 1]
    assert len(victim["resumed_from"]) == 1, victim["resumed_from"]
    resumed = victim["resumed_from"][0]
    assert resumed in rungs and killed["epoch"] <= resumed <= last_written, (killed, resumed, rungs)
    assert [e for e, _ in victim["curve"]] == [1, 2, 3, 4]
    observe(f"killed pid {killed['pid']} with rung checkpoints up to epoch {last_written} written; resumed from "
            f"epoch {resumed}; {victim['epochs']}/4 epochs, {summary['statuses']['error']} errored trials, "
            f"{len(board)}/2 on the board; lost: the epochs since the trial's last rung "
            f"({'its last checkpoint, not yet reported, and ' if resumed < last_written else ''}the one in flight)")


_DRIVER = textwrap.dedent(
    """
    import json, sys
    from pipeline.config import Config
    from pipeline.run import RunContext
    from pipeline.stages.search.stage import search
    from pipeline.storage import open_store
    config = Config.model_validate(json.loads(sys.argv[1]))
    ctx = RunContext(run_id=sys.argv[3], config=config, store=open_store(sys.argv[2]))
    search(ctx, progress=False)
    """
)


@pytest.mark.scenario(2, expected="the search driver's machine dies mid-search; the retried stage restores the "
                                   "experiment (Tuner.restore) and trains no finished trial again")
def test_crashed_driver_rerun_restores_the_experiment(tmp_path, observe):
    from pipeline.stages.search.stage import search

    ctx = make_proxy_run(tmp_path, "crash", trials=4, max_epochs=3, grace_period=3, max_concurrent=1)
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, ctx.config.model_dump_json(), ctx.store.root, ctx.run_id],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.5"},  # the watcher reads what the driver has seen
    )
    try:
        deadline = time.time() + 300
        done_before = {}
        while time.time() < deadline:
            results = trial_results(ctx)
            finished = {t: rows for t, rows in results.items() if rows and rows[-1].get("epoch") == 3}
            if finished:  # at least one trial done, others to come (on a fast machine the next may not show yet)
                done_before = {t: len(r) for t, r in finished.items()}
                break
            assert driver.poll() is None, "the driver ended before it could be crashed"
            time.sleep(0.05)
        assert done_before, "no trial finished before the deadline"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's machine dies, with its local Ray
        driver.wait(30)
    assert not ctx.is_complete("search")

    summary = search(ctx, progress=False)  # the retried stage
    import ray

    ray.shutdown()
    assert summary["restored"] is True
    assert summary["trials"] == 4  # the experiment went on; it did not start 4 new trials
    after = trial_results(ctx)
    for trial, n in done_before.items():
        assert len(after[trial]) == n, "a finished trial was trained again"
    # the restored search selects as a fresh one does: the first attempt's incumbent, the same rule
    from pipeline.stages.search.selection import select

    board = json.loads(ctx.store.get_text("runs/crash/search/leaderboard.json"))
    incumbents = [r for r in board if r["incumbent"]]
    assert len(incumbents) == 1 and incumbents[0]["source"] == "config-default"
    assert incumbents[0]["trial_number"] == min(r["trial_number"] for r in board)
    assert summary["selection"] == select(board, ctx.config.search.min_improvement)
    assert summary["best_trial"] == (summary["selection"]["winner"] if summary["selection"]["decision"] == "winner"
                                     else incumbents[0]["trial_id"])
    observe(f"driver killed with {len(done_before)} trial(s) finished; rerun restored={summary['restored']}, "
            f"{summary['trials']} trials in all (not 4 new ones), finished trials not retrained")
