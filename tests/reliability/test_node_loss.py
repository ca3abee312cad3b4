"""Reliability scenario 9: node loss on the local multi-node cluster (a spot reclaim, a head restart).

A head and two 1-CPU spot worker nodes (``asr-retune cluster up`` on free ports, tmp folders); each
stage runs in a driver process of its own on this machine (the head's), as the Airflow task runs it,
with ``ray.address: auto``. A worker node is removed as a spot reclaim removes it (its raylet and
every process on it at once: :func:`~pipeline.cluster.kill_worker_node`) while a trial, and then a DDP
epoch, is in flight; the head is killed with its driver mid-search and the cluster started again.
Each test states the epochs lost: those trained again after the restart, and the one in flight.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from support.cluster_env import (
    StageDriver,
    ensure_workers,
    free_cluster_config,
    kill_head,
    node_of_pid,
    stop_cluster,
    wait_until,
    with_cluster,
)
from support.run_factory import make_proxy_run
from support.work_area import (
    registered_checkpoints,
    train_checkpoints,
    trial_checkpoints,
    trial_results,
    tune_dir,
)

from pipeline.cluster import (
    cluster_down,
    cluster_spec,
    cluster_status,
    cluster_up,
    kill_worker_node,
    restart_worker_node,
    wait_for_node,
)
from pipeline.config import Config
from pipeline.run import RunContext
from pipeline.storage import open_store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RUN = "node-loss"
SEARCH_EPOCHS = 3  # rungs at 1, 2, 3 (grace 1, factor 2): a trial checkpoints every epoch
TRAIN_EPOCHS = 8
HEAD_TRIALS = 3
REGISTRATION_LAG_S = 1.0  # train.report_poll_s (0.25 s) with room for a loaded 2-core machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(ray settings, spec) of a cluster that is up; each test gets both worker nodes alive."""
    ray_cfg = free_cluster_config(tmp_path_factory.mktemp("cluster-state"))
    spec = cluster_spec(Config(ray=ray_cfg))
    try:
        cluster_up(spec)
        yield ray_cfg, spec
    finally:
        stop_cluster(spec)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Config]:
    """A run with its proxy sample and features, and its configuration; each test copies the store."""
    base = tmp_path_factory.mktemp("node-loss-base")
    return base, make_proxy_run(base, RUN).config


def _run(prepared: tuple[Path, Config], tmp_path: Path, cluster, **sections) -> RunContext:
    """The prepared run in a store of its own, configured for the test cluster (and ``sections``)."""
    (base, config), (ray_cfg, spec) = prepared, cluster
    ensure_workers(spec)
    root = tmp_path / "store"
    shutil.copytree(base / "store", root)
    ctx = RunContext(run_id=RUN, config=config, store=open_store(str(root)))
    mlflow = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "mlart")}
    return with_cluster(ctx, ray_cfg, mlflow=mlflow, **sections)


def _search_settings(trials: int, **kw) -> dict:
    return {"trials": trials, "max_epochs": SEARCH_EPOCHS, "grace_period": 1, "reduction_factor": 2,
            "scheduler": "fifo", "max_failures": 2, "max_concurrent": 1, "budget_s": 600, **kw}


def _actor_node(spec, pid: int) -> str | None:
    """The node id of the actor that ran as process ``pid`` (alive or dead), from the head's state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=spec.dashboard_url, filters=[("pid", "=", pid)], detail=True, timeout=10,
                         raise_on_missing_output=False)
    return actors[0].node_id if actors else None


def _attempts(rows: list[dict]) -> list[list[dict]]:
    """A trial's results split by the process that reported them (one list per attempt, in order)."""
    out: list[list[dict]] = []
    for row in rows:
        if not out or out[-1][0]["pid"] != row["pid"]:
            out.append([])
        out[-1].append(row)
    return out


def _trial_actors(spec) -> list:
    """The trial actors alive on the cluster now (Tune's function trainables), from the head's state API."""
    from ray.util.state import list_actors

    return list_actors(address=spec.dashboard_url, filters=[("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")],
                       detail=True, timeout=10, raise_on_missing_output=False)


def _trial_in_flight(ctx: RunContext, spec, driver: StageDriver, timeout_s: float = 240,
                     snapshotted: bool = False) -> tuple[str, int]:
    """(trial dir, pid of its actor) once a trial has checkpointed its first epoch but not its last: an epoch
    is in flight. Watched from what the trial itself writes at once (its checkpoints in the work area) and the
    state API, not from result.json, which reaches the work area only with Tune's next experiment snapshot:
    on a fast machine a whole trial can finish between two snapshots. ``snapshotted``: also wait until the
    experiment snapshot knows every checkpoint the trial wrote (its result.json has caught up)."""
    def seen():
        started = glob.glob(str(tune_dir(ctx) / "*" / "checkpoint_000000"))
        results = trial_results(ctx) if snapshotted and started else {}
        for path in started:
            trial = os.path.basename(os.path.dirname(path))
            done = trial_checkpoints(ctx, trial)
            if snapshotted and len(results.get(trial, [])) < done:
                continue
            if done < SEARCH_EPOCHS:
                actors = _trial_actors(spec)
                if len(actors) == 1:  # one trial at a time (max_concurrent 1)
                    return trial, int(actors[0].pid)
        return None

    return wait_until(seen, "a trial in flight", timeout_s, driver, poll_s=0.02)


@pytest.mark.scenario(9, expected="a worker node killed (raylet and every process) mid-trial: the trial resumes "
                                   "on the remaining node from its last rung's checkpoint; the search finishes "
                                   "with no errored trial; lost: the epoch in flight")
def test_worker_node_lost_mid_trial_search_resumes_on_the_other_node(prepared, tmp_path, cluster, observe):
    _, spec = cluster
    # batches of 1: epochs of 30 steps, long enough to kill a node in one on a fast machine too
    ctx = _run(prepared, tmp_path, cluster, search=_search_settings(trials=1), train={"batch_size": 1})
    t0 = time.monotonic()
    status_before = cluster_status(spec)  # the node ids, taken now: between seeing the trial and the kill, no delay
    # snapshots every 0.1 s: the driver's view of the trial reaches the work area well inside one epoch
    driver = StageDriver(ctx, "search", tmp_path / "driver.log", trials=1, snapshot_s=0.1)
    try:
        # snapshotted: the driver has taken up every checkpoint written so far. A checkpoint the worker has
        # written but whose report the driver has not yet taken up dies with the node (Tune restores from the
        # checkpoints it registered), and the trial would start again from the one before (CI saw it: the node
        # lost as checkpoint_000000 appeared, the trial started again from scratch: epochs 1, 2, 3 again).
        trial, pid = _trial_in_flight(ctx, spec, driver, snapshotted=True)
        victim = node_of_pid(spec, pid)
        assert victim and victim.startswith("worker-"), f"trial pid {pid} is on node {victim}"
        killed = kill_worker_node(spec, int(victim.rpartition("-")[2]))
        killed_at = time.monotonic()
        resumed = wait_until(lambda: [r for r in trial_results(ctx).get(trial, []) if r["pid"] != pid],
                             "the trial's next attempt reporting", 240, driver)
        recovered_s = time.monotonic() - killed_at
        # the spot group replaces the node (promptly: see ensure_workers) while the trial goes on on the other
        wait_for_node(spec, victim, "DEAD", timeout_s=60)
        restart_worker_node(spec, int(victim.rpartition("-")[2]))
        assert driver.wait(300) == 0, f"the search failed; its log ends:\n{driver.tail()}"
    finally:
        driver.kill()
    wall = time.monotonic() - t0
    summary = ctx.summary("search")
    board = json.loads(ctx.store.get_text(f"runs/{RUN}/search/leaderboard.json"))
    assert summary["statuses"]["error"] == 0 and len(board) == 1
    assert board[0]["status"] == "completed" and board[0]["epochs"] == SEARCH_EPOCHS
    attempts = _attempts(trial_results(ctx)[trial])
    assert len(attempts) == 2, [[r["epoch"] for r in a] for a in attempts]
    before, after = attempts
    last_done = before[-1]["epoch"]  # every epoch is a rung: each report carried its checkpoint
    assert after[0]["resumed_from"] == last_done and board[0]["resumed_from"] == [last_done]
    assert [r["epoch"] for r in after] == list(range(last_done + 1, SEARCH_EPOCHS + 1))
    others = {n["node_id"] for name, n in status_before.items() if name.startswith("worker-") and name != victim}
    assert _actor_node(spec, int(resumed[0]["pid"])) in others  # it went on on the node that was left
    redone = last_done - after[0]["resumed_from"]  # finished epochs trained again: 0 (asserted above)
    observe(f"killed {victim} ({len(killed['killed'])} processes) with the trial in epoch {last_done + 1} "
            f"(epoch {last_done} checkpointed); it resumed on the other worker node {recovered_s:.0f} s later from "
            f"epoch {last_done}; {board[0]['epochs']}/{SEARCH_EPOCHS} epochs, 0 errored trials; epochs lost: "
            f"the one in flight ({redone} finished epochs redone); {wall:.0f} s in all")


def _train_workers(spec) -> list:
    from ray.util.state import list_actors

    return list_actors(address=spec.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                       timeout=10, limit=1000, raise_on_missing_output=False)


@pytest.mark.slow
@pytest.mark.scenario(9, expected="a worker node killed mid-DDP-epoch (2 workers on 2 one-CPU nodes): Ray Train "
                                   "restarts the worker group once the node is restarted and resumes from the last "
                                   "checkpoint; every epoch completes; lost: at most the epoch in flight")
def test_worker_node_lost_mid_ddp_epoch_resumes_on_the_restarted_node(prepared, tmp_path, cluster, observe):
    _, spec = cluster
    ctx = _run(prepared, tmp_path, cluster, train={"epochs": TRAIN_EPOCHS, "num_workers": 2, "max_failures": 2,
                                                   "batch_size": 1, "warmup_steps": 5})  # epochs of a few seconds
    t0 = time.monotonic()
    driver = StageDriver(ctx, "train", tmp_path / "driver.log")
    try:
        # mid-training, two checkpoints registered by the controller (it polls the workers: train.report_poll_s)
        wait_until(lambda: registered_checkpoints(ctx) >= 2, "two epoch checkpoints registered", 300, driver, poll_s=0.05)
        registered, on_disk = registered_checkpoints(ctx), train_checkpoints(ctx)
        killed, killed_wall = kill_worker_node(spec, 0), time.time()
        written = len(on_disk)
        # how long before the kill the checkpoints the controller had not yet registered were written
        unregistered_ages = [killed_wall - os.path.getmtime(p) for p in on_disk[registered:]]
        killed_at = time.monotonic()
        wait_for_node(spec, "worker-0", "DEAD", timeout_s=60)
        restarted = restart_worker_node(spec, 0)
        restarted_s = time.monotonic() - killed_at
        assert driver.wait(420) == 0, f"training failed; its log ends:\n{driver.tail()}"
    finally:
        driver.kill()
    wall = time.monotonic() - t0
    metrics = json.loads(ctx.store.get_text(f"runs/{RUN}/train/metrics.json"))
    history = json.loads(ctx.store.get_text(f"runs/{RUN}/train/history.json"))
    assert [h["epoch"] for h in history] == list(range(1, TRAIN_EPOCHS + 1))
    assert len(metrics["resumed_from"]) == 1, metrics["resumed_from"]
    resumed = metrics["resumed_from"][0]
    redone = len(train_checkpoints(ctx)) - TRAIN_EPOCHS  # finished epochs trained again
    assert registered <= resumed <= written and redone == written - resumed, (registered, written, resumed, redone)
    # a finished epoch is trained again only if its checkpoint was written too shortly before the kill for the
    # controller to register it: lost = the epoch in flight + what was written within that registration lag
    lag = max(unregistered_ages[: written - resumed], default=0.0)
    assert lag <= REGISTRATION_LAG_S, f"{redone} finished epochs redone, the oldest written {lag:.2f} s before the kill"
    nodes = {a.node_id for a in _train_workers(spec) if a.state == "ALIVE" or a.node_id == restarted["node_id"]}
    assert restarted["node_id"] in nodes  # the new group had a rank on the restarted node
    assert ctx.is_complete("train") and ctx.store.exists(f"runs/{RUN}/train/model.pt")
    observe(f"killed worker-0 ({len(killed['killed'])} processes) mid-epoch with {written} epoch checkpoint(s) written, "
            f"{registered} registered; "
            f"node restarted {restarted_s:.0f} s later; the group restarted and resumed from epoch {resumed}; "
            f"{len(history)}/{TRAIN_EPOCHS} epochs; epochs lost: {redone} finished epoch(s) trained again"
            + (f" (written {lag:.2f} s before the kill, not yet registered)" if redone else "") +
            f" plus the one in flight; epochs of "
            f"{metrics['train_s'] / TRAIN_EPOCHS:.1f} s; {metrics['wall_s']:.0f} s of training, {wall:.0f} s in all")


@pytest.mark.slow
@pytest.mark.scenario(9, expected="the head killed with its driver mid-search, the cluster started again: the "
                                   "retried stage restores the experiment (Tuner.restore), finished epochs are not "
                                   "trained again; lost: the epoch in flight")
def test_head_restarted_mid_search_retry_restores_the_experiment(prepared, tmp_path, cluster, observe):
    _, spec = cluster
    ctx = _run(prepared, tmp_path, cluster, search=_search_settings(trials=HEAD_TRIALS), train={"batch_size": 1})
    t0 = time.monotonic()
    driver = StageDriver(ctx, "search", tmp_path / "driver.log", trials=HEAD_TRIALS)
    try:
        # the head dies once the experiment's last snapshot holds the trial's finished epochs
        trial, _ = _trial_in_flight(ctx, spec, driver, snapshotted=True)
    finally:
        driver.kill()  # the head pod is lost: the driver that ran on it ...
    done = trial_checkpoints(ctx, trial)  # the epochs it had finished (and checkpointed)
    head_procs = kill_head(spec)  # ... and the head node's GCS, raylet, dashboard
    before = trial_results(ctx)
    assert not ctx.is_complete("search")
    cluster_down(spec)  # what is left of the old cluster (its worker nodes)
    restart = time.monotonic()
    cluster_up(spec)
    up_s = time.monotonic() - restart
    retry = StageDriver(ctx, "search", tmp_path / "retry.log", trials=HEAD_TRIALS)  # the retried task
    try:
        assert retry.wait(420) == 0, f"the retried search failed; its log ends:\n{retry.tail()}"
    finally:
        retry.kill()
    wall = time.monotonic() - t0
    summary = ctx.summary("search")
    assert summary["restored"] is True and summary["trials"] == HEAD_TRIALS, summary
    assert summary["statuses"]["error"] == 0
    board = json.loads(ctx.store.get_text(f"runs/{RUN}/search/leaderboard.json"))
    assert all(r["status"] == "completed" and r["epochs"] == SEARCH_EPOCHS for r in board)
    after = trial_results(ctx)
    finished = [t for t, rows in before.items() if len(rows) == SEARCH_EPOCHS]
    assert all(after[t] == before[t] for t in finished), "a finished trial was trained again"
    last = _attempts(after[trial])[-1]  # the retry's attempt (a trial restored without a checkpoint starts over)
    resumed = last[0]["resumed_from"]
    assert [r["epoch"] for r in last] == list(range(resumed + 1, SEARCH_EPOCHS + 1))
    # the restore knows the checkpoints of the driver's last experiment snapshot (every 0.5 s here): an epoch
    # finished within that period before the head died is trained again
    redone = done - resumed
    assert 0 <= redone <= 1, (done, resumed)
    observe(f"head killed ({len(head_procs)} processes) with its driver, {len(finished)} trial(s) finished, one in "
            f"epoch {done + 1}; cluster up "
            f"again in {up_s:.0f} s; the retry restored the experiment (restored={summary['restored']}, "
            f"{summary['trials']} trials, not new ones); the interrupted trial, {done} epoch(s) done when the "
            f"head died, resumed from epoch {resumed}; "
            f"epochs lost: {redone} finished epoch(s) trained again plus the one in flight; {wall:.0f} s in all")
