"""A local multi-node Ray cluster for tests: free ports, tmp folders, and a stage driven in a subprocess.

:func:`free_cluster_config` gives a ``ray`` section (``address: auto``) whose ``ray.cluster`` is a
cluster on a block of free ports with its record and Ray temp dir in tmp folders, so that a stage run
in another process (as the Airflow task would) finds that cluster by its configuration alone.
:class:`StageDriver` runs one stage in such a process, on this machine: the head's.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from pipeline.cluster import (
    HEAD,
    ClusterNotUp,
    cluster_down,
    cluster_spec,
    cluster_status,
    read_state,
    restart_worker_node,
)
from pipeline.cluster.node import busy_ports, kill_processes, node_processes, process_of
from pipeline.config import Config, LocalClusterConfig, RayConfig
from pipeline.run import RunContext

HEALTH_WINDOW_S = 10.0  # the GCS's first health checks of a node that joined: 5 s delay, then 3 at 1 s


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (Linux: 32768 unless configured)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_cluster_config(state_dir: Path, workers: int = 2, **ray) -> RayConfig:
    """``ray`` settings (and ``ray``'s other fields) for a cluster of ``workers`` 1-CPU spot nodes on ports
    nothing listens on, below the ephemeral range: there an outgoing connection (a gRPC client, the test's
    own HTTP calls) can take a port the cluster needs, and a restarted node then finds it in use."""
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths must fit
    top = min(_ephemeral_low(), 32768) - 1000  # the block and its dashboard (base + 990) stay below
    for _ in range(50):
        base = random.randrange(10000, top, 10)
        cluster = LocalClusterConfig(workers=workers, cpus_per_worker=1, port=base, dashboard_port=base + 990,
                                     object_store_mb=100, dir=str(state_dir), temp_dir=temp_dir, start_timeout_s=120)
        ray_cfg = RayConfig(address="auto", cluster=cluster, **ray)
        if not busy_ports(cluster_spec(Config(ray=ray_cfg)).all_ports()):
            return ray_cfg
    raise RuntimeError("no free block of ports for a test cluster")


def with_cluster(ctx: RunContext, ray_cfg: RayConfig, **sections) -> RunContext:
    """``ctx`` with its configuration pointed at the test cluster (and ``sections`` updated: name -> fields)."""
    update = {"ray": ray_cfg}
    for name, fields in sections.items():
        update[name] = getattr(ctx.config, name).model_copy(update=fields)
    return RunContext(run_id=ctx.run_id, config=ctx.config.model_copy(update=update), store=ctx.store)


def stop_cluster(spec) -> None:
    """``cluster down`` if it is up, and its Ray temp dir removed."""
    import shutil

    with contextlib.suppress(ClusterNotUp):
        cluster_down(spec)
    shutil.rmtree(spec.temp_dir, ignore_errors=True)


def ensure_workers(spec) -> None:
    """Restart every worker node whose process is gone (an earlier test killed it), and check that it stays.

    A node restarted on its old ports long (~25 s) after its kill can be marked dead by the GCS a few
    seconds after it joined ("Health check failed ... failed to connect to all addresses": the GCS's
    connection to that address is still backing off), so the node is watched through the GCS's health
    check window and started once more if that happened. Tests restart a killed node promptly instead.
    """
    state = read_state(spec)
    for name, node in state["nodes"].items():
        if name == HEAD or process_of(node["pid"], node["create_time"]) is not None:
            continue
        index = int(name.rpartition("-")[2])
        restart_worker_node(spec, index)
        time.sleep(HEALTH_WINDOW_S)
        if not cluster_status(spec)[name]["alive"]:
            restart_worker_node(spec, index)


def node_of_pid(spec, pid: int) -> str | None:
    """The name of the node (head, worker-0, ...) process ``pid`` belongs to, or None."""
    for name, node in read_state(spec)["nodes"].items():
        procs = node_processes(node["pid"], node["create_time"], Path(node["temp_dir"]), node.get("raylet_pid"))
        if any(p.pid == pid for p in procs):
            return name
    return None


def kill_head(spec) -> list[int]:
    """SIGKILL every process of the head node at once (GCS, raylet, dashboard ...): the head pod is lost."""
    node = read_state(spec)["nodes"][HEAD]
    procs = node_processes(node["pid"], node["create_time"], Path(node["temp_dir"]), node.get("raylet_pid"))
    return kill_processes(procs)


_DRIVER = textwrap.dedent(
    """
    import json, sys
    from pipeline.config import Config
    from pipeline.run import RunContext
    from pipeline.storage import open_store
    config = Config.model_validate(json.loads(sys.argv[1]))
    ctx = RunContext(run_id=sys.argv[3], config=config, store=open_store(sys.argv[2]))
    if sys.argv[4] == "search":
        from pipeline.stages.search.stage import search
        search(ctx, trials=int(sys.argv[5]), progress=False)
    else:
        from pipeline.stages.train import train_full
        train_full(ctx)
    """
)


class StageDriver:
    """One stage (``search`` with ``trials``, or ``train``) run in a process of its own, as an Airflow task
    runs it: its output in ``log``; :meth:`wait` returns its exit code, :meth:`kill` ends it and its group.
    ``snapshot_s``: Tune's experiment-snapshot period, which is how often result.json reaches the work area."""

    def __init__(self, ctx: RunContext, stage: str, log: Path, trials: int = 1, snapshot_s: float = 0.5) -> None:
        self.log = log
        env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": str(snapshot_s)}
        env.pop("RAY_ADDRESS", None)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DRIVER, ctx.config.model_dump_json(), ctx.store.root, ctx.run_id, stage,
                 str(trials)], start_new_session=True, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the stage did not end within {timeout_s:.0f} s; its log ends:\n{self.tail()}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def wait_until(check, what: str, timeout_s: float, driver: StageDriver | None = None, poll_s: float = 0.1):
    """Poll ``check()`` until it returns something true (returned); fail with ``what`` (and the driver's log)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if driver is not None and not driver.running():
            raise AssertionError(f"the stage ended (code {driver.proc.returncode}) before {what}; its log ends:\n"
                                 f"{driver.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout_s:.0f} s: {what}" +
                                 (f"; the stage's log ends:\n{driver.tail()}" if driver else ""))
        time.sleep(poll_s)
