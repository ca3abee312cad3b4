"""The local multi-node cluster for real: a head and two spot worker nodes as `ray start` processes on
127.0.0.1; placement on the spot nodes; a worker node killed (raylet and all) and restarted; `down`
leaves none of its processes."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipeline.cluster import (
    HEAD,
    ClusterError,
    ClusterNotUp,
    cluster_down,
    cluster_spec,
    cluster_status,
    cluster_up,
    kill_worker_node,
    read_state,
    restart_worker_node,
    wait_for_node,
)
from pipeline.cluster.node import busy_ports, node_processes
from pipeline.config import Config, RayConfig
from pipeline.ray import ensure_ray, trial_resources, worker_resources

pytestmark = pytest.mark.integration


def _free_spec(tmp_path: Path, **kw):
    """A spec on a block of ports nothing listens on, with its own state and (short) Ray temp dir."""
    temp_dir = kw.pop("temp_dir", None) or Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    for _ in range(50):
        base = random.randrange(20000, 29000, 10)
        options = {"cpus_per_worker": 1, "object_store_mb": 100, "start_timeout_s": 120, **kw}
        spec = cluster_spec(Config(), port=base, dashboard_port=base + 990, state_dir=tmp_path / "state",
                            temp_dir=temp_dir, **options)
        if not busy_ports(spec.all_ports()):
            return spec
    pytest.fail("no free block of ports for a test cluster")


@pytest.fixture
def spec(tmp_path):
    spec = _free_spec(tmp_path)
    yield spec
    import ray

    ray.shutdown()
    with contextlib.suppress(ClusterNotUp):
        cluster_down(spec)
    shutil.rmtree(spec.temp_dir, ignore_errors=True)


def _where(spot: bool, cpus: float = 1.0, hold_s: float = 0.0):
    """A task that returns its node id; with ``spot``, it requests the trial's resources."""
    import ray

    def node_id() -> str:
        time.sleep(hold_s)
        return ray.get_runtime_context().get_node_id()

    resources = trial_resources(Config()) if spot else {}
    custom = {k: v for k, v in resources.items() if k not in ("cpu", "gpu")}
    return ray.remote(node_id).options(num_cpus=cpus, resources=custom)


def _tune_trial_node(config: Config, storage: Path) -> str:
    """The node a one-trial Tune experiment with the search's trial resources ran on."""
    import ray
    from ray import tune

    def trial(_):
        tune.report({"node": ray.get_runtime_context().get_node_id()})

    tuner = tune.Tuner(tune.with_resources(trial, trial_resources(config)),
                       tune_config=tune.TuneConfig(num_samples=1),
                       run_config=tune.RunConfig(name="placement", storage_path=str(storage), verbose=0))
    result = tuner.fit()[0]
    assert result.error is None, result.error
    return result.metrics["node"]


def _ddp_worker():
    """An actor with a DDP worker's resources."""
    import ray

    class Worker:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    ddp = worker_resources(Config(), use_gpu=False)
    return ray.remote(num_cpus=ddp.pop("CPU"), resources=ddp)(Worker).remote()


def _pids(spec, *names: str) -> set[int]:
    """The live processes of nodes ``names`` (default: all)."""
    nodes = read_state(spec)["nodes"]
    return {p.pid for name, node in nodes.items() if not names or name in names
            for p in node_processes(node["pid"], node["create_time"], Path(node["temp_dir"]), node.get("raylet_pid"))}


def _wait_until(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {timeout_s:.0f} s: {what}")
        time.sleep(0.5)


def _running(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running."""
    alive = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
    return alive


def test_cluster_places_spot_work_on_workers_survives_a_node_kill_and_stops_clean(spec, tmp_path, monkeypatch):
    import ray

    status = cluster_up(spec)
    assert status["up"] and status["alive_workers"] == ["worker-0", "worker-1"]
    for name in ("worker-0", "worker-1"):
        assert status[name]["resources"] == {"CPU": 1.0, "spot": 1.0}, status[name]
    assert status[HEAD]["alive"] and "spot" not in status[HEAD]["resources"] and "CPU" not in status[HEAD]["resources"]
    with pytest.raises(ClusterError, match="already up"):
        cluster_up(spec)

    config = Config(ray=RayConfig(address="auto"))
    monkeypatch.setattr("pipeline.cluster.control.cluster_spec", lambda _config: spec)  # ray.cluster.* of this test
    ensure_ray(config)  # `auto`: the recorded local cluster
    head_id, w0_id, w1_id = (status[n]["node_id"] for n in (HEAD, "worker-0", "worker-1"))
    assert ray.get_runtime_context().get_node_id() == head_id  # the driver runs on the head
    assert ray.cluster_resources().get("spot") == 2.0  # the workers' spot, not an in-process Ray's
    assert _tune_trial_node(config, tmp_path / "tune") in {w0_id, w1_id}
    assert ray.get(_where(spot=True).remote(), timeout=60) in {w0_id, w1_id}
    assert ray.get(_where(spot=False).remote(), timeout=60) != head_id  # the head has no CPU for work
    actor = _ddp_worker()
    assert ray.get(actor.node.remote(), timeout=60) in {w0_id, w1_id}
    ray.kill(actor)

    node0 = _pids(spec, "worker-0")
    killed = kill_worker_node(spec, 0)
    assert killed["node"] == "worker-0" and read_state(spec)["nodes"]["worker-0"]["pid"] in killed["killed"]
    assert len(killed["killed"]) >= 4  # ray start, raylet, the agents ...
    left = _running(node0 | set(killed["killed"]))
    assert not left, f"processes of the killed node still running: {left}"
    status = cluster_status(spec)
    assert status["worker-0"]["process"] == "gone" and not status["worker-0"]["alive"]
    assert wait_for_node(spec, "worker-0", "DEAD", timeout_s=30)["ray"] == "DEAD"
    assert ray.get(_where(spot=True).remote(), timeout=60) == w1_id  # the spot work goes to the other node

    restarted = restart_worker_node(spec, 0)
    assert restarted["alive"] and restarted["node_id"] not in (w0_id, None)
    _wait_until(lambda: ray.cluster_resources().get("spot") == 2.0, "the restarted node's spot in the cluster")
    both = [_where(spot=True, hold_s=2.0).remote() for _ in range(2)]  # 1 CPU each: one per worker node
    assert set(ray.get(both, timeout=90)) == {restarted["node_id"], w1_id}
    ray.shutdown()

    pids = _pids(spec)
    assert len(pids) >= 9  # ray start, gcs, raylet, agents, dashboard ... of three nodes
    down = cluster_down(spec)
    assert down["stopped"] and not spec.state_file.exists()
    assert not _running(pids), f"processes left after down: {_running(pids)}"
    assert not busy_ports([(spec.port, "gcs"), (spec.dashboard_port, "dashboard")])
    assert cluster_status(spec)["up"] is False
    with pytest.raises(ClusterNotUp, match="cluster up"):
        cluster_down(spec)


def test_busy_port_and_failed_node_are_clear_errors(spec):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", spec.port))
        s.listen()
        with pytest.raises(ClusterError, match=f"in use: {spec.port} \\(head gcs\\)"):
            cluster_up(spec)
    assert not spec.state_file.exists()

    broken = _free_spec(spec.state_dir.parent / "broken", temp_dir=Path("/proc/asr-rc"))  # Ray cannot make it
    with pytest.raises(ClusterError, match=r"node head failed to start \(`ray start` exited") as err:
        cluster_up(broken)
    assert "No such file or directory: '/proc/asr-rc'" in str(err.value)  # the end of the node's log says why
    assert not broken.state_file.exists() and cluster_status(broken)["up"] is False
