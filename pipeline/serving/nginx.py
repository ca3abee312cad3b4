"""The embedded-default router: nginx ``split_clients`` on 127.0.0.1 in front of the backend.

:class:`NginxRouter` writes ``nginx.conf`` from ``templates/nginx.conf.j2`` and hot-reloads it on
every weight change; its JSON access log gives per-request, per-version status and upstream
latency (:meth:`NginxRouter.requests_since`).

Token decision: the router injects TorchServe's *inference* token upstream
(``proxy_set_header Authorization``) and clients send none. The router on 127.0.0.1 is the
trust boundary; clients never hold the backend's rotating secret, and the config file that
contains it is mode 0600. Set ``serving.nginx.inject_token: false`` to pass clients'
``Authorization`` header through instead.

Reloads never fail a request: nginx's old workers finish what they hold
(:meth:`NginxRouter.wait_drained` waits for them before a version is unregistered), and
keep-alive towards clients is off by default, because a retiring worker closes idle
keep-alive connections and a client reusing one at that instant gets "connection closed
without response" (measured: about 1 in 1,500 requests during a canary with keep-alive on).
Requests with a non-audio ``Content-Type`` are refused by nginx with 415 (TorchServe's own
form decoder answers 500 to a binary ``application/x-www-form-urlencoded`` body).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from pipeline.config import NginxConfig
from pipeline.serving.backend import Upstream
from pipeline.serving.ports import free_port
from pipeline.serving.router import ROUTED_VERSION_HEADER, RoutedRequest, Router, RouterError, check_weights

_TOKEN_RE = re.compile(r"^Bearer [A-Za-z0-9._~+/=-]{1,512}$")
_TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(("html", "xml")),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=StrictUndefined,
)


def find_nginx(binary: str) -> str:
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin")
    if not found:
        raise RouterError(
            f"nginx not found ({binary!r}): the embedded canary router needs it. "
            "Debian/Ubuntu: apt-get install -y nginx (or set serving.nginx.binary)"
        )
    return found


def _json_body(status: int, code: str, message: str) -> str:
    body = json.dumps({"error": code, "message": message, "status": status})
    if "$" in body or "'" in body:
        raise RouterError(f"cannot embed {body!r} in nginx.conf ('$' and quotes are special there)")
    return body


class NginxRouter(Router):
    """nginx ``split_clients`` on 127.0.0.1 in front of the backend's inference port.

    Files under ``prefix``: ``conf/nginx.conf`` (generated, 0600: it may hold the token),
    ``logs/access.jsonl`` (one JSON object per request), ``logs/error.log``,
    ``logs/nginx.pid``, ``router.json`` (port, weights, config generation).
    """

    def __init__(
        self,
        config: NginxConfig,
        *,
        prefix: str | os.PathLike,
        model_name: str,
        upstream: Callable[[], Upstream],
        max_body_bytes: int = 10 * 1024 * 1024,
        timeout_s: float = 60.0,
    ):
        self.config = config
        self.prefix = Path(prefix).expanduser().resolve()
        self.model_name = model_name
        self._upstream = upstream
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.conf = self.prefix / "conf" / "nginx.conf"
        self.access_log = self.prefix / "logs" / "access.jsonl"
        self.error_log = self.prefix / "logs" / "error.log"
        self.pid_file = self.prefix / "logs" / "nginx.pid"
        self.state_file = self.prefix / "router.json"
        self.session = requests.Session()

    # -- state ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.state_file)

    @property
    def port(self) -> int:
        port = self._state().get("port")
        if not port:
            raise RouterError("the nginx router has not been started (no port yet); call ensure_running()")
        return int(port)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def weights(self) -> dict[str, float]:
        return dict(self._state().get("weights") or {})

    def target(self, version: str | None = None) -> tuple[str, dict[str, str]]:
        path = f"/predictions/{self.model_name}" + (f"/{version}" if version else "")
        return self.base_url + path, {}

    # -- process -------------------------------------------------------------------------
    def _pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def running(self) -> bool:
        return self._pid() is not None

    def _nginx(self, *args: str, conf: Path | None = None) -> subprocess.CompletedProcess:
        cmd = [find_nginx(self.config.binary), "-p", f"{self.prefix}/", "-c", str(conf or self.conf), "-e", str(self.error_log), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)

    def ensure_running(self) -> None:
        for d in ("conf", "logs", "tmp"):
            (self.prefix / d).mkdir(parents=True, exist_ok=True)
        state = self._state()
        if self.running() and state.get("port"):
            if state.get("upstream") != _upstream_fingerprint(self._upstream()):
                # the backend restarted (new port or rotated token): same weights, new upstream
                self.set_weights(state.get("weights") or {})
                return
            self._wait_generation(int(state.get("generation", 0)))
            return
        if not state.get("port"):
            state["port"] = self.config.port or free_port(self.config.host)
        state.setdefault("weights", {})
        state["generation"] = int(state.get("generation", 0)) + 1
        self._write_conf(state)
        self._save_state(state)
        proc = self._nginx()
        if proc.returncode != 0:
            raise RouterError(f"nginx failed to start: {(proc.stderr or proc.stdout).strip()[-2000:]} (see {self.error_log})")
        self._wait_generation(state["generation"])

    def stop(self, timeout_s: float = 15.0) -> None:
        pid = self._pid()
        if pid is None:
            return
        self._nginx("-s", "quit")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._pid() is not None:
            time.sleep(0.1)
        if self._pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.5)
        self.pid_file.unlink(missing_ok=True)

    def wait_drained(self, timeout_s: float) -> bool:
        """After a reload, old nginx workers finish their in-flight requests, then exit: wait for that."""
        import psutil

        pid = self._pid()
        if pid is None:
            return True
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                draining = [
                    c for c in psutil.Process(pid).children()
                    if "shutting down" in " ".join(c.cmdline()) and c.status() != psutil.STATUS_ZOMBIE
                ]  # fmt: skip
            except psutil.Error:
                return True
            if not draining:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def set_weights(self, weights: dict[str, float]) -> None:
        weights = check_weights(weights)
        if not self.running():
            state = self._state()
            state["weights"] = weights
            self._save_state(state)
            self.ensure_running()
            return
        state = self._state()
        state["weights"] = weights
        state["generation"] = int(state.get("generation", 0)) + 1
        self._write_conf(state)
        old_workers = self._workers()
        proc = self._nginx("-s", "reload")
        if proc.returncode != 0:
            raise RouterError(f"nginx reload failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
        self._save_state(state)
        self._wait_generation(state["generation"])
        self._wait_retired(old_workers)

    def _workers(self) -> set[int]:
        import psutil

        pid = self._pid()
        try:
            return {c.pid for c in psutil.Process(pid).children()} if pid else set()
        except psutil.Error:
            return set()

    def _wait_retired(self, old: set[int], timeout_s: float = 15.0) -> None:
        """Until every pre-reload worker has exited or is shutting down (it then accepts no new connection).

        The master starts the new workers before it tells the old ones to quit: without this
        wait a new connection could still land on an old worker (old weights) right after
        the new configuration answered.
        """
        import psutil

        deadline = time.monotonic() + timeout_s
        while old and time.monotonic() < deadline:
            alive = set()
            for pid in old:
                try:
                    proc = psutil.Process(pid)
                    if proc.status() != psutil.STATUS_ZOMBIE and "shutting down" not in " ".join(proc.cmdline()):
                        alive.add(pid)
                except psutil.Error:
                    pass
            if not alive:
                return
            old = alive
            time.sleep(0.02)
        if old:
            raise RouterError(f"old nginx workers {sorted(old)} did not start shutting down within {timeout_s:g} s after a reload")

    def _wait_generation(self, generation: int, timeout_s: float = 15.0) -> None:
        """Block until nginx answers with the config of ``generation`` (reload is asynchronous)."""
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.config.host}:{self._state()['port']}/_asr/router"
        last = None
        while time.monotonic() < deadline:
            try:
                r = self.session.get(url, timeout=1)
                last = r.status_code
                if r.status_code == 200 and int(r.json().get("generation", -1)) >= generation:
                    return
            except (requests.RequestException, ValueError) as exc:
                last = type(exc).__name__
            time.sleep(0.05)
        raise RouterError(f"nginx did not serve config generation {generation} within {timeout_s:g} s (last: {last}); see {self.error_log}")

    # -- config --------------------------------------------------------------------------
    def _write_conf(self, state: dict[str, Any]) -> None:
        """Render and validate (``nginx -t``) the config; records the upstream it was written for."""
        upstream = self._upstream()
        state["upstream"] = _upstream_fingerprint(upstream)
        text = render_nginx_conf(
            port=int(state["port"]),
            host=self.config.host,
            model_name=self.model_name,
            upstream_base=upstream.base_url,
            weights=state.get("weights") or {},
            generation=int(state["generation"]),
            auth_header=upstream.auth_header if self.config.inject_token else None,
            max_body_bytes=self.max_body_bytes,
            timeout_s=self.timeout_s,
            run_as_root=os.geteuid() == 0,
            client_keepalive=self.config.client_keepalive,
        )
        new = self.conf.with_name("nginx.conf.new")
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        proc = self._nginx("-t", "-q", conf=new)
        if proc.returncode != 0:
            raise RouterError(f"generated nginx config is invalid: {(proc.stderr or proc.stdout).strip()[-2000:]}")
        os.replace(new, self.conf)

    # -- request log ---------------------------------------------------------------------
    def log_mark(self) -> int:
        try:
            return self.access_log.stat().st_size
        except FileNotFoundError:
            return 0

    def requests_since(self, mark: Any) -> list[RoutedRequest]:
        try:
            with open(self.access_log, "rb") as f:
                f.seek(int(mark or 0))
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line still being written
            out.append(_parse_log_record(rec))
        return out


def _upstream_fingerprint(upstream: Upstream) -> str:
    """Identifies the upstream a config was written for, without storing the token itself."""
    auth = hashlib.sha256((upstream.auth_header or "").encode()).hexdigest()[:16]
    return f"{upstream.base_url}#{auth}"


def _first_number(value: Any) -> float | None:
    """nginx writes ``-`` or a comma/colon list when several upstreams were tried; take the last."""
    if value is None:
        return None
    text = str(value).replace(":", ",").split(",")[-1].strip()
    try:
        return float(text)
    except ValueError:
        return None


def _parse_log_record(rec: dict[str, Any]) -> RoutedRequest:
    upstream_time = _first_number(rec.get("upstream_response_time"))
    upstream_status = _first_number(rec.get("upstream_status"))
    return RoutedRequest(
        time=float(rec.get("msec") or 0.0),
        version=rec.get("version") or None,
        status=int(rec.get("status") or 0),
        upstream_status=int(upstream_status) if upstream_status is not None else None,
        latency_s=upstream_time if upstream_time is not None else float(rec.get("request_time") or 0.0),
        uri=str(rec.get("uri") or ""),
        probe=rec.get("probe") or None,
    )


def _nobody_group() -> str:
    for name in ("nogroup", "nobody"):
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            return name
    return "nogroup"


def _error_bodies(model_name: str, max_body_bytes: int) -> dict[str, str]:
    """The JSON bodies nginx answers itself (no version routed, bad type, too large, unknown path, backend down)."""
    return {
        "no_route": _json_body(503, "no_version_routed", f"no version of {model_name} is routed yet"),
        "bad_type": _json_body(
            415, "unsupported_media_type",
            "send WAV or FLAC bytes with Content-Type audio/wav, audio/flac or application/octet-stream",
        ),  # fmt: skip
        "too_large": _json_body(413, "too_large", f"request body larger than {max_body_bytes} bytes"),
        "not_found": _json_body(404, "not_found", f"unknown path; POST audio to /predictions/{model_name}"),
        "bad_gateway": _json_body(502, "backend_unavailable", "the model server did not answer"),
        "timeout": _json_body(504, "backend_timeout", "the model server did not answer in time"),
    }


def render_nginx_conf(
    *,
    port: int,
    host: str,
    model_name: str,
    upstream_base: str,
    weights: dict[str, float],
    generation: int,
    auth_header: str | None,
    max_body_bytes: int,
    timeout_s: float,
    run_as_root: bool = False,
    client_keepalive: bool = False,
) -> str:
    """The whole nginx.conf for one split, from ``templates/nginx.conf.j2`` (pure function: unit-testable)."""
    weights = check_weights(weights)
    if auth_header is not None and not _TOKEN_RE.match(auth_header):
        raise RouterError("refusing to write an Authorization header with unexpected characters into nginx.conf")
    status_body = json.dumps({"generation": generation, "weights": weights, "model": model_name})
    if "$" in status_body or "'" in status_body:
        raise RouterError("model name or versions contain characters nginx cannot embed")
    # split_clients: every version but the largest gets its share, the largest takes "*"
    ordered = sorted(((v, w) for v, w in weights.items() if w > 0), key=lambda vw: vw[1])
    return _TEMPLATES.get_template("nginx.conf.j2").render(
        generation=generation,
        nobody_group=_nobody_group() if run_as_root else None,
        upstream_hostport=upstream_base.split("://", 1)[-1].rstrip("/"),
        routed=bool(ordered),
        shares=[(version, f"{w:g}") for version, w in ordered[:-1]],
        rest_version=ordered[-1][0] if ordered else "",
        host=host,
        port=port,
        client_keepalive=client_keepalive,
        max_body_bytes=max_body_bytes,
        routed_header=ROUTED_VERSION_HEADER,
        auth_header=auth_header,
        timeout_s=int(timeout_s),
        model_name=model_name,
        model_pattern=re.escape(model_name),
        bodies=_error_bodies(model_name, max_body_bytes),
        status_body=status_body,
    )
