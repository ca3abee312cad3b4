"""The serving-backend interface the canary and the routers depend on.

TorchServe is one implementation (:class:`pipeline.serving.torchserve.TorchServe`); the
canary logic never talks to TorchServe directly, so the server can be swapped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from pipeline.serving.archive import ModelArchive


class ServingError(RuntimeError):
    """A serving-backend operation failed; the message names the operation and the server's answer."""


@dataclass(frozen=True)
class Upstream:
    """Where a router sends inference traffic: a base URL (scheme://host:port) and the header that authorizes it."""

    base_url: str
    auth_header: str | None = None  # the full header value, e.g. "Bearer abc"


@dataclass(frozen=True)
class VersionCounters:
    """Cumulative per-version counters from the backend's metrics (e.g. TorchServe's prometheus endpoint)."""

    requests: float = 0.0
    inference_us: float = 0.0
    queue_us: float = 0.0

    def minus(self, before: "VersionCounters | None") -> "VersionCounters":
        if before is None:
            return self
        return VersionCounters(
            self.requests - before.requests, self.inference_us - before.inference_us, self.queue_us - before.queue_us
        )

    def mean_inference_ms(self) -> float | None:
        return self.inference_us / self.requests / 1000.0 if self.requests > 0 else None


@dataclass
class VersionInfo:
    version: str
    is_default: bool = False
    workers: int = 0
    ready_workers: int = 0
    worker_ids: tuple[str, ...] = ()  # e.g. process ids: a changed id is a restarted (crashed) worker
    extra: dict = field(default_factory=dict)


class ServingBackend(ABC):
    """Versions of one model behind one inference endpoint."""

    model_name: str

    @abstractmethod
    def ensure_running(self) -> None:
        """Start the server if it is not running; return once it is healthy."""

    @abstractmethod
    def healthy(self) -> bool: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def register(self, archive: ModelArchive, *, workers: int | None = None) -> None:
        """Verify the archive's checksum, then load it as a new version (workers ready on return)."""

    @abstractmethod
    def unregister(self, version: str) -> None:
        """Remove a version; removing a version that is not registered is not an error."""

    @abstractmethod
    def set_default(self, version: str) -> None: ...

    @abstractmethod
    def default_version(self) -> str | None: ...

    @abstractmethod
    def versions(self) -> list[VersionInfo]: ...

    @abstractmethod
    def upstream(self) -> Upstream:
        """Base URL and current authorization for inference requests (read fresh every call)."""

    @abstractmethod
    def prediction_path(self, version: str | None = None) -> str:
        """The inference path of one explicit version (``None``: the default version)."""

    def version_counters(self) -> dict[str, VersionCounters]:
        """Cumulative per-version counters; empty when the backend exposes none."""
        return {}

    def has_version(self, version: str) -> bool:
        return any(v.version == version for v in self.versions())
