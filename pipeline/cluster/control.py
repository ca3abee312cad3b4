"""Start, inspect and stop the local cluster, and kill or restart one of its worker nodes.

Every function takes the configuration (the cluster ``ray.cluster`` describes) or a
:class:`~pipeline.cluster.plan.ClusterSpec`, and acts only on the processes recorded in that spec's
``cluster.json``: never on another Ray of this machine (no bare ``ray stop``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from pipeline.cluster.node import (
    busy_ports,
    kill_processes,
    node_processes,
    process_of,
    raise_failed,
    start_process,
)
from pipeline.cluster.plan import (
    HEAD,
    NODE_LABEL,
    ClusterError,
    ClusterSpec,
    cluster_spec,
    worker_name,
)
from pipeline.cluster.state import (
    auth_mode,
    clear_state,
    ensure_token,
    new_state,
    node_env,
    read_state,
    require_state,
    use_auth,
    write_state,
)
from pipeline.config import PROJECT_ROOT, Config

STOP_GRACE_S = 20.0  # `down`: how long a node's `ray start` may drain and stop its processes before SIGKILL
POLL_S = 0.5
HIDDEN_RESOURCES = {"memory", "object_store_memory"}


def _spec(target: Config | ClusterSpec) -> ClusterSpec:
    return target if isinstance(target, ClusterSpec) else cluster_spec(target)


def cluster_up(target: Config | ClusterSpec) -> dict[str, Any]:
    """Start the head and the worker nodes, wait until Ray sees them all, record them; returns the status."""
    spec = _spec(target)
    state = read_state(spec)
    if state is not None:
        running = [n for n, node in state["nodes"].items() if process_of(node["pid"], node["create_time"])]
        if running:
            raise ClusterError(f"a local Ray cluster is already up at {state['address']} (running: "
                               f"{', '.join(running)}; record {spec.state_file}): use it, or "
                               "`asr-retune cluster down` first")
        clear_state(spec)  # the record of a cluster whose processes are all gone
    busy = busy_ports(spec.all_ports())
    if busy:
        listed = ", ".join(f"{p} ({what})" for p, what in busy[:5]) + (" ..." if len(busy) > 5 else "")
        raise ClusterError(f"ports the cluster needs are in use: {listed}; stop what listens there, or choose "
                           "other ports (ray.cluster.port, ray.cluster.dashboard_port)")
    mode = auth_mode()
    ensure_token(mode)
    use_auth(mode)
    shutil.rmtree(spec.temp_dir, ignore_errors=True)
    state = new_state(spec, mode)
    write_state(spec, state)
    try:
        _start_and_wait(spec, state, [HEAD])
        _start_and_wait(spec, state, [worker_name(i) for i in range(spec.workers)])
    except BaseException:
        _stop(state, list(state["nodes"]), grace_s=0.0)
        clear_state(spec)
        raise
    return cluster_status(spec)


def cluster_down(target: Config | ClusterSpec) -> dict[str, Any]:
    """Stop every process of the recorded cluster (worker nodes, then the head) and remove its record."""
    spec = _spec(target)
    state = require_state(spec)
    names = list(state["nodes"])
    workers = [n for n in names if n != HEAD]
    killed = _stop(state, workers, grace_s=STOP_GRACE_S)
    killed.update(_stop(state, [n for n in names if n == HEAD], grace_s=STOP_GRACE_S))
    stray = node_processes(None, None, Path(state["temp_dir"]))  # anything left of an earlier generation
    if stray:
        killed["stray"] = kill_processes(stray)
    clear_state(spec)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    return {"stopped": True, "address": state["address"], "processes": {k: len(v) for k, v in killed.items()}}


def cluster_status(target: Config | ClusterSpec) -> dict[str, Any]:
    """Each recorded node: its process running or gone, Ray's view of it (ALIVE, DEAD), its resources."""
    spec = _spec(target)
    state = read_state(spec)
    if state is None:
        return {"up": False, "state_file": str(spec.state_file), "hint": "start one with `asr-retune cluster up`"}
    seen = _ray_view(state)
    out: dict[str, Any] = {"up": False, "address": state["address"], "dashboard_url": state["dashboard_url"],
                           "spot_resource": state["spot_resource"], "state_file": str(spec.state_file)}
    for name, node in state["nodes"].items():
        out[name] = _node_status(node, seen)
    out["up"] = bool(out.get(HEAD, {}).get("alive"))
    out["alive_workers"] = sorted(n for n in state["nodes"] if n != HEAD and out[n]["alive"])
    return out


def kill_worker_node(target: Config | ClusterSpec, index: int) -> dict[str, Any]:
    """SIGKILL worker node ``index``'s raylet and every other process of that node at once, as a spot
    reclaim does; the record stays, so that :func:`restart_worker_node` can bring it back."""
    spec = _spec(target)
    state = require_state(spec)
    name, node = _worker(state, index)
    procs = _processes(node)
    if not procs:
        raise ClusterError(f"node {name} is not running: nothing to kill (restart it with restart_worker_node)")
    procs.sort(key=lambda p: _name_of(p) != "raylet")  # the raylet first
    return {"node": name, "killed": kill_processes(procs), "node_id": node.get("node_id")}


def restart_worker_node(target: Config | ClusterSpec, index: int) -> dict[str, Any]:
    """Start worker node ``index`` again (a fresh raylet with a new node id) and wait until Ray sees it."""
    spec = _spec(target)
    state = require_state(spec)
    name, node = _worker(state, index)
    if process_of(node["pid"], node["create_time"]):
        raise ClusterError(f"node {name} is still running (pid {node['pid']}): kill it first")
    left = _processes(node)  # workers its killed raylet left behind
    if left:
        kill_processes(left)
    ports = spec.node_ports(name, _next_generation(state, name))  # the restart's block (plan.ClusterSpec.node_ports)
    busy = busy_ports([(p, f"{name} {what}") for what, p in ports.items() if what != "max_worker"])
    if busy:
        raise ClusterError(f"node {name}'s ports are still in use: {busy}; wait a moment and retry")
    use_auth(state["auth_mode"])
    _start_and_wait(spec, state, [name])
    return {"node": name, **cluster_status(spec)[name]}


def wait_for_node(target: Config | ClusterSpec, name: str, ray_state: str = "ALIVE",
                  timeout_s: float = 60.0) -> dict[str, Any]:
    """Wait until Ray sees node ``name`` in ``ray_state`` (ALIVE or DEAD); returns the node's status."""
    spec = _spec(target)
    state = require_state(spec)
    if name not in state["nodes"]:
        raise ClusterError(f"no node {name!r} in the cluster (nodes: {', '.join(state['nodes'])})")
    deadline = time.monotonic() + timeout_s
    while True:
        status = _node_status(state["nodes"][name], _ray_view(state))
        if status["ray"] == ray_state:
            return status
        if time.monotonic() > deadline:
            raise ClusterError(f"node {name} is {status['ray']} in Ray after {timeout_s:.0f} s, not {ray_state}")
        time.sleep(POLL_S)


def local_cluster_address(config: Config) -> str | None:
    """The GCS address of the local cluster recorded for ``config`` (None when none was started), with this
    process set up to authenticate to it."""
    spec = cluster_spec(config)
    state = read_state(spec)
    if state is None:
        return None
    head = state["nodes"].get(HEAD, {})
    if not process_of(head.get("pid"), head.get("create_time")):
        raise ClusterError(f"the local cluster recorded in {spec.state_file} has no running head: "
                           "`asr-retune cluster down`, then `asr-retune cluster up`")
    use_auth(state["auth_mode"])
    return state["address"]


def _worker(state: dict[str, Any], index: int) -> tuple[str, dict[str, Any]]:
    name = worker_name(index)
    if name not in state["nodes"]:
        workers = [n for n in state["nodes"] if n != HEAD]
        raise ClusterError(f"no worker node {index}: the cluster has {len(workers)} ({', '.join(workers)})")
    return name, state["nodes"][name]


def _start_and_wait(spec: ClusterSpec, state: dict[str, Any], names: list[str]) -> None:
    """Start nodes ``names`` together, record them, and wait until Ray sees each one ALIVE."""
    procs = {name: _start(spec, state, name) for name in names}
    write_state(spec, state)
    deadline = time.monotonic() + spec.start_timeout_s
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise_failed(name, Path(state["nodes"][name]["log"]), f"`ray start` exited with code {proc.returncode}")
        seen = _ray_view(state) or {}
        alive = {n: seen[n] for n in names if seen.get(n, {}).get("state") == "ALIVE"
                 and seen[n]["start_time_ms"] >= state["nodes"][n]["started_ms"] - 5_000}
        if len(alive) == len(names):
            for name, view in alive.items():
                state["nodes"][name].update(node_id=view["node_id"], raylet_pid=_raylet_pid(procs[name].pid))
            write_state(spec, state)
            return
        if time.monotonic() > deadline:
            late = next(n for n in names if n not in alive)
            raise_failed(late, Path(state["nodes"][late]["log"]),
                         f"not alive in Ray after {spec.start_timeout_s:.0f} s")
        time.sleep(POLL_S)


def _next_generation(state: dict[str, Any], name: str) -> int:
    """The number of node ``name``'s next start (0 for its first)."""
    return state["nodes"].get(name, {}).get("generation", -1) + 1


def _start(spec: ClusterSpec, state: dict[str, Any], name: str) -> subprocess.Popen:
    generation = _next_generation(state, name)
    log = spec.state_dir / "logs" / f"{name}.log"
    proc = start_process(spec.start_command(name, generation), node_env(state["auth_mode"], state["address"]), log,
                         PROJECT_ROOT)
    leader = process_of(proc.pid, None)
    state["nodes"][name] = {
        "name": name, "pid": proc.pid, "create_time": leader.create_time() if leader else None,
        "generation": generation, "started_ms": int(time.time() * 1000), "log": str(log),
        "temp_dir": str(spec.node_temp_dir(name, generation)),
        "ports": spec.node_ports(name, generation), "resources": spec.node_resources(name), "node_id": None,
    }
    return proc


def _raylet_pid(leader_pid: int) -> int | None:
    with contextlib.suppress(Exception):
        return next(p.pid for p in psutil.Process(leader_pid).children(recursive=True) if p.name() == "raylet")
    return None


def _stop(state: dict[str, Any], names: list[str], grace_s: float) -> dict[str, list[int]]:
    """Stop nodes ``names`` together: SIGTERM each ``ray start`` (it drains its node and stops its
    processes), then SIGKILL whatever is left after ``grace_s``."""
    groups = {}
    for name in names:
        node = state["nodes"][name]
        groups[name] = (process_of(node["pid"], node["create_time"]), _processes(node))
    leaders = [leader for leader, _ in groups.values() if leader is not None]
    every = [p for _, procs in groups.values() for p in procs]
    kill_processes(every, grace_s=grace_s, leaders=leaders)
    return {name: [p.pid for p in procs] for name, (_, procs) in groups.items()}


def _processes(node: dict[str, Any]) -> list[psutil.Process]:
    return node_processes(node["pid"], node["create_time"], Path(node["temp_dir"]), node.get("raylet_pid"))


def _ray_view(state: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Ray's view of the recorded nodes by name (from the head's state API), or None when the head's
    dashboard does not answer. A restarted node's earlier, dead entries yield to its live one."""
    use_auth(state["auth_mode"])
    try:
        from ray.util.state import list_nodes

        nodes = list_nodes(address=state["dashboard_url"], detail=True, timeout=5, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - a dashboard that is starting, stopped or gone: no view
        return None
    view: dict[str, dict[str, Any]] = {}
    for n in sorted(nodes, key=lambda n: (n.state == "ALIVE", n.start_time_ms or 0)):
        name = (n.labels or {}).get(NODE_LABEL)
        if name:
            view[name] = {"state": n.state, "node_id": n.node_id, "start_time_ms": n.start_time_ms or 0,
                          "resources": {k: v for k, v in (n.resources_total or {}).items()
                                        if k not in HIDDEN_RESOURCES and ":" not in k}}
    return view


def _node_status(node: dict[str, Any], seen: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    running = process_of(node["pid"], node["create_time"]) is not None
    view = (seen or {}).get(node["name"], {})
    ray_state = view.get("state") or ("unknown" if seen is None else "absent")  # unknown: no answer from the head
    return {"alive": running and ray_state == "ALIVE", "process": "running" if running else "gone",
            "ray": ray_state, "pid": node["pid"], "node_id": view.get("node_id") or node.get("node_id"),
            "resources": view.get("resources", {})}


def _name_of(proc: psutil.Process) -> str:
    with contextlib.suppress(Exception):
        return proc.name()
    return ""
