"""The serving sections: TorchServe (``serving:``), its router (nginx or Istio) and the canary (``canary:``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from pipeline.config.base import Section

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _loopback(server: str) -> AfterValidator:
    def check(host: str) -> str:
        if host not in LOOPBACK_HOSTS:
            raise ValueError(f"the embedded {server} binds to loopback only (127.0.0.1)")
        return host

    return AfterValidator(check)


RouterHost = Annotated[str, _loopback("router")]
TorchServeHost = Annotated[str, _loopback("TorchServe")]


class NginxConfig(Section):
    """The embedded-default traffic splitter: nginx ``split_clients`` on 127.0.0.1."""

    binary: str = Field("nginx", description="nginx executable (a name on PATH, /usr/sbin is searched too)")
    prefix: str | None = Field(None, description="nginx prefix folder (config, pid, logs); default: <serving.work_dir>/nginx")
    host: RouterHost = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="client-facing port; 0 = a free port picked at first start")
    client_keepalive: bool = Field(
        False,
        description="HTTP keep-alive towards clients. Off: a reload retires workers, which close idle keep-alive "
        "connections; a client reusing one at that instant gets 'connection closed without response' (a POST is not "
        "retried). Upstream keep-alive to the backend stays on.",
    )
    inject_token: bool = Field(
        True,
        description="nginx adds TorchServe's inference token upstream, so clients never hold it "
        "(the router on 127.0.0.1 is the trust boundary)",
    )


class IstioConfig(Section):
    """Production traffic splitter: weights in an Istio VirtualService, patched through the Kubernetes API.

    The defaults match ``infra/k8s/base/serving/istio.yaml``: VirtualService
    ``asr-retune/asr-torchserve``, http route ``asr-predictions``, DestinationRule subsets
    ``production`` and ``canary`` (one TorchServe Deployment per track).
    """

    api_server: str = Field("https://kubernetes.default.svc", description="Kubernetes API server URL")
    namespace: str = "asr-retune"
    virtual_service: str = "asr-torchserve"
    route_name: str = Field("asr-predictions", description="the http route of the VirtualService that carries the split")
    host: str = Field("asr-torchserve.asr-retune.svc.cluster.local", description="destination service host")
    port: int = Field(8080, ge=1, le=65535)
    hosts: list[str] = Field(default_factory=lambda: ["asr-torchserve.asr-retune.svc.cluster.local"])
    gateways: list[str] = Field(default_factory=lambda: ["mesh"])
    subset_mode: Literal["track", "version"] = Field(
        "track",
        description="track: two fixed subsets (production/canary), versions mapped to them in annotations; "
        "version: one subset per version, <subset_prefix><version>",
    )
    production_subset: str = "production"
    canary_subset: str = "canary"
    subset_prefix: str = Field("v-", description="version mode: DestinationRule subset of a version")
    token_file: str | None = Field(
        "/var/run/secrets/kubernetes.io/serviceaccount/token", description="bearer token file (service account); null = no auth"
    )
    ca_file: str | None = Field("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt", description="CA bundle; null = system CAs")
    verify_tls: bool = True
    timeout_s: float = Field(10.0, gt=0)


class ServingConfig(Section):
    """TorchServe on 127.0.0.1 (embedded default) and the router in front of it."""

    model_name: str = "asr"
    work_dir: str = Field(".asr-retune/serving", description="TorchServe config, model store, logs, key file, state")
    host: TorchServeHost = "127.0.0.1"
    inference_port: int = Field(0, ge=0, le=65535, description="0 = a free port picked at start")
    management_port: int = Field(0, ge=0, le=65535)
    metrics_port: int = Field(0, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="workers per registered version")
    batch_size: int = Field(4, ge=1, le=256)
    max_batch_delay_ms: int = Field(10, ge=0, le=10000)
    response_timeout_s: int = Field(60, ge=1)
    startup_timeout_s: float = Field(120.0, gt=0, description="wait for /ping after starting TorchServe")
    register_timeout_s: float = Field(300.0, gt=0, description="synchronous registration (workers loaded)")
    token_expiration_min: int = Field(
        43200, ge=1, description="TorchServe key lifetime; deploy/rollback re-read key_file.json every time"
    )
    java_home: str | None = None
    max_audio_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_duration_s: float = Field(30.0, gt=0)
    min_duration_s: float = Field(0.1, gt=0)
    handler_threads: int = Field(1, ge=1, le=64, description="torch threads per worker")
    router: Literal["nginx", "istio"] = "nginx"
    nginx: NginxConfig = NginxConfig()
    istio: IstioConfig = IstioConfig()
    ORDERED = (("min_duration_s", "max_duration_s", True),)

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not MODEL_NAME_RE.match(v):
            raise ValueError("model_name: letters, digits, '_' and '-' only")
        return v

    def work_path(self) -> Path:
        return Path(self.work_dir).expanduser().resolve()

    def handler_options(self) -> dict[str, Any]:
        """The production options written into the archive's ``handler_config.json``."""
        return {
            "max_bytes": self.max_audio_bytes,
            "max_duration_s": self.max_duration_s,
            "min_duration_s": self.min_duration_s,
            "torch_threads": self.handler_threads,
        }


class CanaryConfig(Section):
    """Stepped traffic, the analysis window and the health thresholds of a canary."""

    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 100.0], description="canary weight (percent) per step")
    intervals_per_step: int = Field(1, ge=1, le=100, description="passing analysis intervals needed to leave a step")
    max_consecutive_failures: int = Field(2, ge=1, le=100, description="failing intervals in a row that roll back")
    window_s: float = Field(60.0, gt=0, description="longest analysis interval")
    window_requests: int = Field(200, ge=1, description="replayed requests through the split per interval (upper bound)")
    paired_requests: int = Field(20, ge=0, description="labeled utterances sent to BOTH versions per interval (WER)")
    concurrency: int = Field(4, ge=1, le=256, description="replay clients")
    min_canary_requests: int = Field(5, ge=1, description="fewer canary requests in an interval = a failing interval")
    request_timeout_s: float = Field(30.0, gt=0)
    replay_utterances: int = Field(200, ge=1, description="golden utterances loaded for replay")
    golden_version: str | None = Field(None, description="golden set to replay; default demo.golden_version")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="canary 5xx / transport errors per request")
    max_latency_ratio: float = Field(1.5, gt=0, description="canary p95 service time / production p95 service time")
    latency_slack_ms: float = Field(20.0, ge=0, description="p95 differences below this never fail (noise floor)")
    max_p95_ms: float | None = Field(
        None, gt=0, description="optional ceiling on the canary's p95 as clients see it (router view, queueing included)"
    )
    max_empty_rate_increase: float = Field(0.05, ge=0, le=1, description="canary minus production empty-transcript rate")
    max_wer_increase: float = Field(0.02, ge=0, description="canary minus production WER on the paired requests (absolute)")
    grace_period_s: float = Field(30.0, ge=0, description="wait before unregistering the replaced version")
    seed: int = 0

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("steps: at least one step")
        if any(not 0 < s <= 100 for s in v):
            raise ValueError(f"steps: every weight must be in (0, 100], got {v}")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"steps: weights must increase, got {v}")
        return v
