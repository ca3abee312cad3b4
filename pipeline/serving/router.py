"""The traffic splitter in front of the serving backend, behind one interface.

:class:`Router` is what the canary drives: ``set_weights({"3": 95, "4": 5})`` sends 5 % of
requests to version 4 and the rest to version 3, always addressing **explicit versions**
(``/predictions/<model>/<version>``) so the backend's per-version metrics are labelled by
version rather than ``default``. Every response carries ``X-ASR-Routed-Version`` naming the
version the router chose. Implementations:

* :class:`pipeline.serving.nginx.NginxRouter` (embedded default): nginx ``split_clients`` on
  127.0.0.1, config rendered from a template and hot-reloaded; its access log gives
  per-request, per-version status and latency (:meth:`Router.requests_since`).
* :class:`pipeline.serving.istio.IstioRouter` (production): weights in an Istio
  VirtualService, patched through the Kubernetes API.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from pipeline.config import VERSION_RE
from pipeline.serving.backend import ServingError

ROUTED_VERSION_HEADER = "X-ASR-Routed-Version"
PROBE_HEADER = "X-ASR-Probe"


@dataclass(frozen=True)
class RoutedRequest:
    """One request as the router saw it."""

    time: float
    version: str | None  # the explicit version it was sent to (None: answered by the router itself)
    status: int  # returned to the client
    upstream_status: int | None
    latency_s: float  # upstream response time (request time when not proxied)
    uri: str
    probe: str | None = None


class RouterError(ServingError):
    """The router could not be configured or started; the message says what to fix."""


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """Validate ``{version: percent}``: known-good version names, non-negative, summing to 100."""
    if not weights:
        return {}
    clean = {}
    for version, w in weights.items():
        if not VERSION_RE.match(str(version)):
            raise RouterError(f"invalid version name {version!r} in weights")
        if not 0 <= float(w) <= 100:
            raise RouterError(f"weight of {version} must be in [0, 100], got {w}")
        clean[str(version)] = round(float(w), 2)
    total = sum(clean.values())
    if abs(total - 100.0) > 0.01:
        raise RouterError(f"weights must sum to 100, got {total:g} ({clean})")
    return {v: w for v, w in clean.items()}


class Router(ABC):
    """Splits one model's traffic between explicit versions."""

    model_name: str

    @abstractmethod
    def ensure_running(self) -> None: ...

    @abstractmethod
    def set_weights(self, weights: dict[str, float]) -> None:
        """``{version: percent}`` summing to 100; takes effect before this returns."""

    @abstractmethod
    def weights(self) -> dict[str, float]: ...

    @abstractmethod
    def target(self, version: str | None = None) -> tuple[str, dict[str, str]]:
        """URL and headers for a client request: the split (``None``) or one explicit version."""

    def log_mark(self) -> Any:
        """An opaque position in the router's request log (see :meth:`requests_since`)."""
        return None

    def requests_since(self, mark: Any) -> list[RoutedRequest] | None:
        """Requests the router handled since ``mark``; ``None`` when the router keeps no per-request log."""
        return None

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until requests routed under earlier weights have finished (``True``) or ``timeout_s``.

        Call it before unregistering a version that no longer gets traffic: a model server
        may drop requests still in flight to a version being removed. The default knows no
        in-flight state and returns at once (use the grace period).
        """
        return True

    def stop(self) -> None:  # noqa: B027 - optional
        """Stop a locally run router (no-op for a remote one)."""
