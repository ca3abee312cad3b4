"""One node's processes on this machine: start its ``ray start --block``, find everything it runs, kill it.

A node is the process group that ``ray start --block`` leads (GCS, raylet, agents, dashboard) plus the
worker processes its raylet forks, which Ray puts in process groups of their own: they are found as
the raylet's descendants, or by the raylet's pid in their environment.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from pipeline.cluster.plan import ClusterError

LOG_TAIL_LINES = 25


def start_process(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (so that ending this process leaves it running), its output
    appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def process_of(pid: int | None, create_time: float | None) -> psutil.Process | None:
    """The running process ``pid`` if it is still the one started at ``create_time`` (pids are reused)."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            reap(pid)
            return None
        return proc
    except psutil.Error:
        return None


def reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is a child of this process (no zombie left behind)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def node_processes(pid: int | None, create_time: float | None, temp_dir: Path,
                   raylet_pid: int | None = None) -> list[psutil.Process]:
    """Every live process of the node led by ``pid``: its descendants, any process whose command line
    names a path under the node's ``temp_dir``, and any Ray worker of its raylet (``RAY_RAYLET_PID``),
    which outlives a killed raylet for a moment. Never this process or one of its ancestors."""
    found: dict[int, psutil.Process] = {}
    leader = process_of(pid, create_time)
    if leader is not None:
        found[leader.pid] = leader
        with contextlib.suppress(psutil.Error):
            found.update({p.pid: p for p in leader.children(recursive=True)})
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.pid not in found and (_names_dir(proc.info["cmdline"] or (), str(temp_dir))
                                      or _worker_of(proc, raylet_pid)):
            found[proc.pid] = proc
    spared = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    return [p for pid_, p in found.items() if pid_ not in spared]


def _names_dir(cmdline: list[str] | tuple[str, ...], directory: str) -> bool:
    """Whether an argument is ``directory`` or a path under it (``/tmp/t`` is not under ``/tmp/t2``)."""
    under = directory.rstrip("/") + "/"
    return any(arg == directory or under in arg or arg.endswith("=" + directory) for arg in cmdline)


def _worker_of(proc: psutil.Process, raylet_pid: int | None) -> bool:
    if not raylet_pid or not (proc.info["name"] or "").startswith("ray::"):
        return False
    try:
        return proc.environ().get("RAY_RAYLET_PID") == str(raylet_pid)
    except psutil.Error:
        return False


def kill_processes(procs: list[psutil.Process], grace_s: float = 0.0, leaders: list[psutil.Process] = ()) -> list[int]:
    """End ``procs``: SIGTERM ``leaders`` first and give them ``grace_s`` to stop the rest, then SIGKILL
    every one still alive (in the order given). Returns the pids of ``procs``."""
    if leaders and grace_s > 0:
        for leader in leaders:
            with contextlib.suppress(psutil.Error):
                leader.send_signal(signal.SIGTERM)
        _wait_gone([*leaders, *procs], grace_s)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _wait_gone(procs, 10.0)
    for proc in procs:
        reap(proc.pid)
    return [p.pid for p in procs]


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def busy_ports(ports: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The (port, what) of ``ports`` that a server on this machine already listens on (any address)."""
    busy = []
    for port, what in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no clash
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                busy.append((port, what))
    return busy


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def raise_failed(name: str, log_path: Path, why: str) -> None:
    """Raise :class:`ClusterError` for node ``name`` that did not start, with the end of its log."""
    tail = log_tail(log_path)
    raise ClusterError(f"node {name} failed to start ({why}); the last lines of {log_path}:\n{tail or '(empty)'}")
