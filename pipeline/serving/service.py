"""The serving service the configuration describes: the backend (TorchServe) and the router in front of it."""

from __future__ import annotations

import contextlib
from typing import Any

from pipeline.config import ServingConfig
from pipeline.serving.backend import ServingBackend
from pipeline.serving.router import Router


def open_services(serving: ServingConfig) -> tuple[ServingBackend, Router]:
    """The serving backend and the router ``serving`` describes (nothing is started)."""
    from pipeline.serving.torchserve import TorchServe

    backend = TorchServe(serving)
    return backend, open_router(serving, backend)


def open_router(serving: ServingConfig, backend: ServingBackend) -> Router:
    """``serving.router``: nginx on 127.0.0.1 in front of ``backend``, or Istio's VirtualService."""
    if serving.router == "istio":
        from pipeline.serving.istio import IstioRouter

        return IstioRouter(serving.istio, model_name=serving.model_name)
    from pipeline.serving.nginx import NginxRouter

    prefix = serving.nginx.prefix or str(serving.work_path() / "nginx")
    return NginxRouter(
        serving.nginx,
        prefix=prefix,
        model_name=serving.model_name,
        upstream=backend.upstream,
        max_body_bytes=serving.max_audio_bytes,
        timeout_s=serving.response_timeout_s,
    )


def serving_status(serving: ServingConfig) -> dict[str, Any]:
    """What is running: TorchServe (ports, versions, default) and the router (URL, weights)."""
    backend, router = open_services(serving)
    out: dict[str, Any] = {"torchserve": {"healthy": backend.healthy()}, "router": {}}
    if out["torchserve"]["healthy"]:
        out["torchserve"].update(
            inference=getattr(backend, "inference_url", None),
            management=getattr(backend, "management_url", None),
            default_version=backend.default_version(),
            versions=[{"version": v.version, "workers": v.workers, "ready": v.ready_workers} for v in backend.versions()],
        )
    with contextlib.suppress(Exception):
        out["router"] = {"url": router.target()[0], "weights": router.weights()}
    return out


def stop_serving(serving: ServingConfig) -> dict[str, Any]:
    """Stop the local router and TorchServe (registrations are lost; the next deploy restores production)."""
    backend, router = open_services(serving)
    router.stop()
    backend.stop()
    return {"stopped": True}
