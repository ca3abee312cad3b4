"""The local cluster's plan: its nodes, their CPUs and resources, ports and folders, and each ``ray start``.

One head node (the driver's: ``head_cpus``, 0 by default, so no trial or DDP worker lands there) and
``workers`` worker nodes that carry the spot resource, all on 127.0.0.1. Every port is fixed from
``port`` so that several raylets share the host without clashing with each other or with another Ray
on the machine: the head's GCS on ``port``, its Ray Client server on ``port+1``, node ``k`` (0 = head)
on ``port+10k+10 ..`` and its worker processes on ``port+100(k+1) .. +99``: a block of
``100 (workers + 2)`` ports. A worker node's odd-numbered starts (its restarts, alternately) take the
same layout one block higher: a node started again on its dead predecessor's address was once declared
dead by the GCS soon after joining (likely its health checks to that address were still backing off).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, project_path

HOST = "127.0.0.1"
HEAD = "head"
NODE_LABEL = "asr-retune/node"  # label of every node: its name (head, worker-0, ...)
WORKER_PORT_SPAN = 100  # ports for one node's worker processes
MIN_OBJECT_STORE_MB = 75  # Ray refuses less
SOCKET_ROOT_MAX = 40  # AF_UNIX paths hold 107 bytes; Ray appends ~65 (session, sockets/plasma_store)
NODE_PORTS = ("node_manager", "object_manager", "dashboard_agent_listen", "dashboard_agent_grpc",
              "runtime_env_agent", "metrics_export")
DEFAULTS: dict[str, Any] = {
    "workers": 2, "cpus_per_worker": None, "gpus_per_worker": 0, "head_cpus": 0, "port": 6390,
    "dashboard_port": 8265, "object_store_mb": 512, "dir": ".asr-retune/ray-cluster", "temp_dir": None,
    "start_timeout_s": 90.0,
}


class ClusterError(RuntimeError):
    """The local cluster cannot do what was asked; the message says why and what to do."""


class ClusterNotUp(ClusterError):
    """No local cluster is recorded as up."""


@dataclass(frozen=True)
class ClusterSpec:
    """What ``cluster up`` starts, and where it records it (``state_dir``) and lets Ray write (``temp_dir``)."""

    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    head_cpus: int = 0
    spot_resource: str | None = "spot"
    port: int = 6390
    dashboard_port: int = 8265
    object_store_mb: int = 512
    state_dir: Path = field(default_factory=lambda: project_path(DEFAULTS["dir"]))
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "asr-ray-6390")
    start_timeout_s: float = 90.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ClusterError(f"a local cluster needs at least one worker node, not {self.workers}")
        if not 1024 <= self.port <= 65535 - self.last_port_offset():
            raise ClusterError(f"cluster port {self.port} is out of range: it needs ports {self.port} .. "
                               f"{self.port + self.last_port_offset()} below 65536")
        if self.port <= self.dashboard_port <= self.port + self.last_port_offset():
            raise ClusterError(f"dashboard port {self.dashboard_port} is among the nodes' ports ({self.port} .. "
                               f"{self.port + self.last_port_offset()}): choose another port or dashboard port")
        if self.object_store_mb < MIN_OBJECT_STORE_MB:
            raise ClusterError(f"object store of {self.object_store_mb} MiB per node is below Ray's minimum, "
                               f"{MIN_OBJECT_STORE_MB} MiB")
        if len(str(self.temp_dir)) > SOCKET_ROOT_MAX:
            raise ClusterError(f"Ray temp dir {self.temp_dir} is too long for its sockets (at most "
                               f"{SOCKET_ROOT_MAX} characters): set ray.cluster.temp_dir to a short path")

    @property
    def address(self) -> str:
        """The head's GCS address: what ``ray.init(address=...)`` and ``ray start --address`` take."""
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The head's dashboard: the state API and Ray Jobs (``JobSubmissionClient``)."""
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "cluster.json"

    def node_names(self) -> list[str]:
        return [HEAD] + [worker_name(i) for i in range(self.workers)]

    def port_block(self) -> int:
        """Ports of one layout (every node's services and worker ranges); restarts use a second one."""
        return WORKER_PORT_SPAN * (self.workers + 2)

    def last_port_offset(self) -> int:
        return 2 * self.port_block() - 1

    def node_ports(self, name: str, generation: int = 0) -> dict[str, int]:
        """The fixed ports of start ``generation`` of node ``name``: its services and its worker processes'
        range (a worker node's odd generations one block higher; the head's never move)."""
        k = self.node_names().index(name)
        base = self.port + (self.port_block() if name != HEAD and generation % 2 else 0)
        ports = {what: base + 10 * (k + 1) + j for j, what in enumerate(NODE_PORTS)}
        ports["min_worker"] = base + WORKER_PORT_SPAN * (k + 1)
        ports["max_worker"] = ports["min_worker"] + WORKER_PORT_SPAN - 1
        if name == HEAD:
            ports.update(gcs=self.port, ray_client_server=self.port + 1, dashboard=self.dashboard_port)
        return ports

    def all_ports(self) -> list[tuple[int, str]]:
        """(port, what) for every port the cluster binds or may bind on a restart, worker ranges included."""
        out = []
        for name in self.node_names():
            for generation in (0,) if name == HEAD else (0, 1):
                ports = self.node_ports(name, generation)
                lo, hi = ports.pop("min_worker"), ports.pop("max_worker")
                label = name if generation == 0 else f"{name} (restarted)"
                out += [(p, f"{label} {what}") for what, p in ports.items()]
                out += [(p, f"{label} worker processes") for p in range(lo, hi + 1)]
        return sorted(out)

    def node_resources(self, name: str) -> dict[str, float]:
        """The custom resources node ``name`` advertises: the spot resource on worker nodes."""
        if name == HEAD or not self.spot_resource:
            return {}
        return {self.spot_resource: float(max(1, self.cpus_per_worker))}

    def node_temp_dir(self, name: str, generation: int) -> Path:
        """Ray's temp dir of one start of node ``name`` (a restarted node gets a fresh one)."""
        short = "h" if name == HEAD else "w" + name.rpartition("-")[2]
        return self.temp_dir / f"{short}.{generation}"

    def start_command(self, name: str, generation: int = 0) -> list[str]:
        """``ray start --block ...`` of node ``name`` (run with :func:`node_env`)."""
        head = name == HEAD
        ports = self.node_ports(name, generation)
        cmd = [ray_executable(), "start", "--block", "--disable-usage-stats", "--node-ip-address", HOST,
               "--num-cpus", str(self.head_cpus if head else self.cpus_per_worker),
               "--num-gpus", str(0 if head else self.gpus_per_worker),
               "--resources", json.dumps(self.node_resources(name)),
               "--labels", f"{NODE_LABEL}={name}",
               "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
               "--temp-dir", str(self.node_temp_dir(name, generation))]
        for what in (*NODE_PORTS, "min_worker", "max_worker"):
            cmd += [f"--{what.replace('_', '-')}-port", str(ports[what])]
        if head:
            cmd += ["--head", "--port", str(self.port), "--ray-client-server-port", str(ports["ray_client_server"]),
                    "--include-dashboard", "true", "--dashboard-host", HOST,
                    "--dashboard-port", str(self.dashboard_port)]
        else:
            cmd += ["--address", self.address]
        return cmd


def worker_name(i: int) -> str:
    return f"worker-{i}"


def ray_executable() -> str:
    """The ``ray`` command of this Python environment (next to ``sys.executable``)."""
    path = Path(sys.executable).with_name("ray")
    if not path.exists():
        raise ClusterError(f"no `ray` command next to {sys.executable}: install ray[default] in this environment")
    return str(path)


def cluster_spec(config: Config, **overrides: Any) -> ClusterSpec:
    """The cluster ``config.ray`` describes (``ray.cluster``, ``ray.spot_resource``); ``overrides`` replace
    fields of the result (a test's own ports and folders)."""
    ray_cfg = config.ray
    section = getattr(ray_cfg, "cluster", None)
    values = {k: getattr(section, k, v) if section is not None else v for k, v in DEFAULTS.items()}
    workers = int(overrides.get("workers", values["workers"]))
    kwargs: dict[str, Any] = {
        "workers": workers,
        "cpus_per_worker": int(values["cpus_per_worker"] or max(1, (os.cpu_count() or 1) // workers)),
        "gpus_per_worker": int(values["gpus_per_worker"]), "head_cpus": int(values["head_cpus"]),
        "spot_resource": getattr(ray_cfg, "spot_resource", "spot"), "port": int(values["port"]),
        "dashboard_port": int(values["dashboard_port"]), "object_store_mb": int(values["object_store_mb"]),
        "state_dir": project_path(values["dir"]), "start_timeout_s": float(values["start_timeout_s"]),
    }
    kwargs.update(overrides)
    kwargs.setdefault("temp_dir", Path(values["temp_dir"] or Path(tempfile.gettempdir()) / f"asr-ray-{kwargs['port']}"))
    kwargs["state_dir"], kwargs["temp_dir"] = Path(kwargs["state_dir"]), Path(kwargs["temp_dir"])
    return ClusterSpec(**kwargs)
