"""A fault-injecting HTTP proxy for tests: sits between boto3 and the moto server.

It forwards every request to the upstream server unchanged, except that a rule may
answer instead with an error (503 SlowDown, 500, ...) or delay the request. It counts
what it saw so a test can assert retries really happened. An outage (``down_after``, or
setting ``down``) makes the upstream vanish at a chosen request: from then on every
request is dropped unanswered, as by a dead server, until ``down`` is cleared.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>injected by faultproxy</Message></Error>"
)


@dataclass
class Fault:
    """Answer ``status``/``code`` to requests matching ``match`` (method, path, query), ``times`` times."""

    match: Callable[[str, str], bool]
    status: int = 503
    code: str = "SlowDown"
    times: int = 1
    delay_s: float = 0.0


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status) once answered
    arrived: list[tuple[str, str]] = field(default_factory=list)  # (method, path) as soon as received
    down_after: Callable[[str, str], bool] | None = None  # the upstream dies once this request was answered
    down: bool = False

    def start(self) -> str:
        up = urlparse(self.upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                proxy.arrived.append((self.command, self.path))
                if proxy.down:
                    proxy.seen.append((self.command, self.path, 0))
                    self.close_connection = True  # no answer at all
                    return
                with lock:
                    fault = next((f for f in proxy.faults if f.times > 0 and f.match(self.command, self.path)), None)
                    if fault is not None and not fault.delay_s:
                        fault.times -= 1
                if fault is not None and fault.delay_s:
                    time.sleep(fault.delay_s)
                    fault = None
                if fault is not None:
                    payload = _S3_ERROR.format(code=fault.code).encode()
                    proxy.seen.append((self.command, self.path, fault.status))
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                proxy.seen.append((self.command, self.path, resp.status))
                if proxy.down_after is not None and proxy.down_after(self.command, self.path):
                    proxy.down = True  # before the client has the answer, so nothing slips through after it
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = _handle

        lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
