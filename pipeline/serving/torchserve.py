"""TorchServe 0.12 on 127.0.0.1, driven from Python: start, health, register, default version, stop.

Everything of one server lives in ``serving.work_dir``::

    config.properties    generated: every address (REST and gRPC) on 127.0.0.1, free ports,
                         token auth on, model API on
    key_file.json        written by TorchServe (token auth); read for every call
    model-store/         the .mar files it may load
    logs/                TorchServe's logs + launcher.log (its stdout/stderr)
    tmp/                 TEMP/TMPDIR of the server: its pid file and the workers' unix sockets
    server.json          ports, pid and process group of the running server

The server runs in its own session (process group) so it outlives the command that started
it; :meth:`TorchServe.stop` ends that group. A second ``ensure_running`` reuses a healthy
server. Token authorization stays on: the inference key authorizes /ping and /predictions,
the management key the management API, both read from ``key_file.json``; TorchServe answers
a missing or wrong token with HTTP 400 ``InvalidKeyException``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from pipeline.config import ServingConfig
from pipeline.serving.archive import ModelArchive, check_version, verify_archive
from pipeline.serving.backend import ServingBackend, ServingError, Upstream, VersionCounters, VersionInfo
from pipeline.serving.ports import free_port

KEY_FILE = "key_file.json"
STATE_FILE = "server.json"
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 108 bytes; the workers' sockets live in tmp/
_METRIC_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001
        return True


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` for every sample line of a prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = {k: v for k, v in _LABEL.findall(m.group(2) or "")}
        out.append((m.group(1), labels, value))
    return out


class TorchServe(ServingBackend):
    """One TorchServe server (see the module docstring for its files)."""

    def __init__(self, config: ServingConfig, *, session: requests.Session | None = None):
        self.config = config
        self.model_name = config.model_name
        self.work = config.work_path()
        self.model_store = self.work / "model-store"
        self.logs = self.work / "logs"
        self.props_file = self.work / "config.properties"
        self.state_file = self.work / STATE_FILE
        self.key_file = self.work / KEY_FILE
        self.session = session or requests.Session()
        self._proc: subprocess.Popen | None = None
        self._state: dict[str, Any] | None = None

    # -- state ---------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any] | None:
        if self._state is None and self.state_file.exists():
            with contextlib.suppress(ValueError, OSError):
                self._state = json.loads(self.state_file.read_text(encoding="utf-8"))
        return self._state

    def _require_state(self) -> dict[str, Any]:
        state = self._load_state()
        if not state:
            raise ServingError(f"TorchServe is not running (no {self.state_file}); call ensure_running() first")
        return state

    @property
    def inference_url(self) -> str:
        return f"http://{self.config.host}:{self._require_state()['inference_port']}"

    @property
    def management_url(self) -> str:
        return f"http://{self.config.host}:{self._require_state()['management_port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self._require_state()['metrics_port']}"

    def keys(self, wait_s: float = 0.0) -> dict[str, str]:
        """``{"management", "inference", "api"}`` keys from TorchServe's key_file.json."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                data = json.loads(self.key_file.read_text(encoding="utf-8"))
                return {
                    "management": data["management"]["key"],
                    "inference": data["inference"]["key"],
                    "api": data["API"]["key"],
                }
            except (OSError, ValueError, KeyError, TypeError):
                if time.monotonic() >= deadline:
                    raise ServingError(
                        f"cannot read TorchServe's token file {self.key_file} (token authorization must stay on)"
                    ) from None
                time.sleep(0.1)

    def _auth(self, kind: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[kind]}"}

    # -- lifecycle -----------------------------------------------------------------------
    def healthy(self) -> bool:
        state = self._load_state()
        if not state or not _pid_alive(int(state["pid"])):
            return False
        try:
            r = self.session.get(f"{self.inference_url}/ping", headers=self._auth("inference"), timeout=2)
        except (requests.RequestException, ServingError):
            return False
        return r.status_code == 200 and r.json().get("status") == "Healthy"

    def _write_properties(self, ports: dict[str, int]) -> None:
        c = self.config
        lines = {
            "inference_address": f"http://{c.host}:{ports['inference_port']}",
            "management_address": f"http://{c.host}:{ports['management_port']}",
            "metrics_address": f"http://{c.host}:{ports['metrics_port']}",
            # gRPC cannot be switched off in 0.12: bind it to 127.0.0.1 on free ports (token auth applies too)
            "grpc_inference_address": c.host,
            "grpc_inference_port": str(ports["grpc_inference_port"]),
            "grpc_management_address": c.host,
            "grpc_management_port": str(ports["grpc_management_port"]),
            "enable_model_api": "true",
            "disable_token_authorization": "false",
            "token_expiration_min": str(c.token_expiration_min),
            "metrics_mode": "prometheus",
            "disable_system_metrics": "true",
            "model_store": str(self.model_store),
            "install_py_dep_per_model": "false",
            "decode_input_request": "false",
            "default_workers_per_model": str(c.workers),
            "default_response_timeout": str(c.response_timeout_s),
            "max_request_size": str(c.max_audio_bytes + 64 * 1024),
            "initial_worker_port": str(ports["worker_port"]),
            "enable_envvars_config": "false",
        }
        text = "# generated by asr-retune (pipeline/serving/torchserve.py); regenerated at every start\n"
        text += "".join(f"{k}={v}\n" for k, v in lines.items())
        self.props_file.write_text(text, encoding="utf-8")

    def _tmp_dir(self) -> Path:
        tmp = self.work / "tmp"
        if len(str(tmp / ".ts.sock.65535")) > _SOCKET_PATH_MAX:
            tmp = Path(tempfile.mkdtemp(prefix="asr-ts-"))
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def ensure_running(self) -> None:
        if self.healthy():
            return
        state = self._load_state()
        if state and _pid_alive(int(state["pid"])):
            # started but not (yet) healthy: give it the startup timeout, then replace it
            if self._wait_healthy(self.config.startup_timeout_s, raise_on_timeout=False):
                return
            self.stop()
        self._cleanup_stale()
        self.start()

    def _cleanup_stale(self) -> None:
        self.state_file.unlink(missing_ok=True)
        self.key_file.unlink(missing_ok=True)
        self._state = None

    def start(self) -> None:
        """Start a new server (use :meth:`ensure_running` to reuse a running one)."""
        java = shutil.which("java", path=os.path.join(self.config.java_home, "bin") if self.config.java_home else None)
        if not java:
            raise ServingError("java not found: TorchServe needs Java 17 (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)")
        c = self.config
        for d in (self.work, self.model_store, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        ports = {
            "inference_port": c.inference_port or free_port(c.host),
            "management_port": c.management_port or free_port(c.host),
            "metrics_port": c.metrics_port or free_port(c.host),
            "worker_port": free_port(c.host),
            "grpc_inference_port": free_port(c.host),
            "grpc_management_port": free_port(c.host),
        }
        if len(set(ports.values())) < len(ports):
            raise ServingError(f"port collision in {ports}; set distinct serving.*_port values")
        self._write_properties(ports)
        tmp = self._tmp_dir()
        env = dict(os.environ)
        env.update(
            TEMP=str(tmp), TMPDIR=str(tmp), LOG_LOCATION=str(self.logs), METRICS_LOCATION=str(self.logs),
        )
        if c.java_home:
            env["JAVA_HOME"] = c.java_home
        self.key_file.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-c", "import sys; from ts.model_server import start; sys.exit(start())",
            "--start", "--foreground", "--ncs",
            "--ts-config", str(self.props_file),
            "--model-store", str(self.model_store),
        ]  # fmt: skip
        log = open(self.logs / "launcher.log", "ab")
        try:
            self._proc = subprocess.Popen(
                cmd, cwd=self.work, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        state = {**ports, "pid": self._proc.pid, "pgid": self._proc.pid, "tmp_dir": str(tmp), "started_at": time.time()}
        self.state_file.write_text(json.dumps(state, indent=2), encoding="utf-8")
        self._state = state
        self._wait_healthy(c.startup_timeout_s)

    def _wait_healthy(self, timeout_s: float, raise_on_timeout: bool = True) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServingError(
                    f"TorchServe exited with code {self._proc.returncode} while starting; see {self.logs / 'launcher.log'}"
                )
            if self.healthy():
                return True
            time.sleep(0.25)
        if raise_on_timeout:
            raise ServingError(
                f"TorchServe did not answer /ping within {timeout_s:g} s; see {self.logs / 'launcher.log'} and ts_log.log"
            )
        return False

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the server's process group (SIGTERM, then SIGKILL after ``timeout_s``)."""
        state = self._load_state()
        if state:
            pgid, pid = int(state["pgid"]), int(state["pid"])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self._group_alive(pgid, pid):
                if self._proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self._proc.wait(timeout=0.1)
                time.sleep(0.1)
            if self._group_alive(pgid, pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
            tmp = state.get("tmp_dir")
            if tmp and Path(tmp).name.startswith("asr-ts-"):
                shutil.rmtree(tmp, ignore_errors=True)
        self._proc = None
        self._cleanup_stale()

    @staticmethod
    def _group_alive(pgid: int, pid: int) -> bool:
        if _pid_alive(pid):
            return True
        try:
            import psutil

            for proc in psutil.process_iter(["pid", "status"]):
                if _safe_pgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
        except Exception:  # noqa: BLE001
            return False
        return False

    # -- management API ------------------------------------------------------------------
    def _manage(self, method: str, path: str, *, params: dict[str, Any] | None = None, timeout: float = 30.0,
                ok: tuple[int, ...] = (200,)) -> requests.Response:  # fmt: skip
        url = f"{self.management_url}{path}"
        for attempt in (1, 2):
            try:
                r = self.session.request(method, url, params=params, headers=self._auth("management"), timeout=timeout)
            except requests.RequestException as exc:
                raise ServingError(f"TorchServe management {method} {path} failed: {exc}") from None
            if r.status_code == 400 and "InvalidKeyException" in r.text and attempt == 1:
                time.sleep(0.2)  # the key file may have just been rotated: read it again
                continue
            break
        if r.status_code not in ok:
            raise ServingError(f"TorchServe management {method} {path} -> HTTP {r.status_code}: {_message(r)}")
        return r

    def register(self, archive: ModelArchive, *, workers: int | None = None) -> None:
        """Copy the archive into the model store if needed, verify its sha256 there, register it."""
        check_version(archive.version)
        target = self.model_store / archive.file_name
        if Path(archive.path).resolve() != target.resolve():
            self.model_store.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(archive.path, tmp)
            os.replace(tmp, target)
        verify_archive(target, archive.sha256)
        c = self.config
        params = {
            "url": archive.file_name,
            "model_name": self.model_name,
            "initial_workers": workers or c.workers,
            "synchronous": "true",
            "batch_size": c.batch_size,
            "max_batch_delay": c.max_batch_delay_ms,
            "response_timeout": c.response_timeout_s,
        }
        self._manage("POST", "/models", params=params, timeout=c.register_timeout_s)

    def unregister(self, version: str) -> None:
        check_version(version)
        self._manage(
            "DELETE", f"/models/{self.model_name}/{version}", params={"synchronous": "true"}, ok=(200, 404),
            timeout=self.config.register_timeout_s,
        )  # fmt: skip

    def set_default(self, version: str) -> None:
        check_version(version)
        self._manage("PUT", f"/models/{self.model_name}/{version}/set-default")

    def versions(self) -> list[VersionInfo]:
        r = self._manage("GET", f"/models/{self.model_name}/all", ok=(200, 404))
        if r.status_code == 404:
            return []
        default = self.default_version()
        out = []
        for m in r.json():
            workers = m.get("workers") or []
            out.append(
                VersionInfo(
                    version=str(m["modelVersion"]),
                    is_default=str(m["modelVersion"]) == default,
                    workers=len(workers),
                    ready_workers=sum(1 for w in workers if w.get("status") == "READY"),
                    worker_ids=tuple(sorted(str(w.get("pid") or w.get("id")) for w in workers)),
                    extra={"modelUrl": m.get("modelUrl"), "batchSize": m.get("batchSize")},
                )
            )
        return out

    def default_version(self) -> str | None:
        r = self._manage("GET", f"/models/{self.model_name}", ok=(200, 404))
        if r.status_code == 404:
            return None
        data = r.json()
        return str(data[0]["modelVersion"]) if data else None

    # -- inference side ------------------------------------------------------------------
    def upstream(self) -> Upstream:
        return Upstream(self.inference_url, f"Bearer {self.keys()['inference']}")

    def prediction_path(self, version: str | None = None) -> str:
        if version is None:
            return f"/predictions/{self.model_name}"
        return f"/predictions/{self.model_name}/{check_version(version)}"

    def predict(self, audio: bytes, version: str | None = None, content_type: str = "audio/wav",
                timeout: float = 30.0) -> requests.Response:  # fmt: skip
        """One request straight to TorchServe (with the inference token); the caller reads the status."""
        return self.session.post(
            self.inference_url + self.prediction_path(version),
            data=audio,
            headers={"Content-Type": content_type, **self._auth("inference")},
            timeout=timeout,
        )

    def metrics_text(self) -> str:
        r = self.session.get(f"{self.metrics_url}/metrics", timeout=10)
        if r.status_code != 200:
            raise ServingError(f"TorchServe metrics -> HTTP {r.status_code}")
        return r.text

    def version_counters(self) -> dict[str, VersionCounters]:
        """Per-version cumulative request count and latency sums (``ts_inference_*`` counters).

        TorchServe exports these as counters (sums), not histograms: they give a mean latency
        per version, not percentiles (those come from the router's access log).
        """
        acc: dict[str, dict[str, float]] = {}
        for name, labels, value in parse_prometheus(self.metrics_text()):
            if labels.get("model_name") != self.model_name:
                continue
            field = {
                "ts_inference_requests_total": "requests",
                "ts_inference_latency_microseconds": "inference_us",
                "ts_queue_latency_microseconds": "queue_us",
            }.get(name)
            if field:
                acc.setdefault(labels.get("model_version", "default"), {})[field] = value
        return {v: VersionCounters(**d) for v, d in acc.items()}


def _safe_pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _message(r: requests.Response) -> str:
    try:
        data = r.json()
        return str(data.get("message") or data)
    except ValueError:
        return r.text[:500]
