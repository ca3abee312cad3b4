"""A real ``mlflow server`` on 127.0.0.1 for integration tests (SQLite store, local artifacts).

Started as a subprocess of the venv's ``mlflow`` with one worker, in its own process group;
ready when ``/health`` answers. Starting takes 10-30 s (imports and database migrations), so
:class:`MlflowServer` starts without waiting: build fixtures meanwhile, then call
:meth:`MlflowServer.wait_ready`. The server log is shown when it fails to come up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipeline.serving.ports import free_port

MLFLOW = Path(sys.executable).with_name("mlflow")



class MlflowServer:
    def __init__(self, workdir: Path):
        if not MLFLOW.exists():
            raise RuntimeError(f"{MLFLOW} not found: install the project ('make setup')")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None
        self._ready = False

    def start(self) -> "MlflowServer":
        cmd = [
            str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", str(self.workdir / "artifacts"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=env,
                                         start_new_session=True)
        return self

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 120.0) -> str:
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while not self._ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    self._ready = resp.status == 200
            except OSError:
                pass
            if not self._ready:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server not healthy after {timeout_s}s:\n{self._log_tail()}")
                time.sleep(0.2)
        return self.url

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (``signal.SIGKILL``: crash it); :meth:`start` again serves the same store on the same port."""
        self._ready = False
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None


@contextlib.contextmanager
def mlflow_server(workdir: Path, *, timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``mlflow server`` with its store under ``workdir``; yield its URL once healthy."""
    server = MlflowServer(workdir).start()
    try:
        yield server.wait_ready(timeout_s)
    finally:
        server.stop()
