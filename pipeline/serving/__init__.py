"""Serving: model archives, the TorchServe backend, and the canary routers.

* :mod:`pipeline.serving.handler` -- the TorchServe handler (self-contained, packaged in the .mar)
* :mod:`pipeline.serving.archive` -- ``build_archive`` / ``verify_archive`` (torch-model-archiver)
* :mod:`pipeline.serving.backend` -- the ``ServingBackend`` interface
* :mod:`pipeline.serving.torchserve` -- ``TorchServe``: lifecycle + management API on 127.0.0.1
* :mod:`pipeline.serving.router` -- the ``Router`` interface and ``NginxRouter``
* :mod:`pipeline.serving.istio` -- ``IstioRouter`` (VirtualService weights via the Kubernetes API)
* :mod:`pipeline.serving.config` -- ``ServingConfig`` / ``CanaryConfig``

The canary itself (stage ``deploy``) is :mod:`pipeline.canary`. Importing this package does
not import torch.
"""

from pipeline.serving.archive import ArchiveError, ModelArchive, build_archive, verify_archive
from pipeline.serving.backend import ServingBackend, ServingError, Upstream, VersionCounters, VersionInfo
from pipeline.serving.config import CanaryConfig, IstioConfig, NginxConfig, ServingConfig
from pipeline.serving.router import ROUTED_VERSION_HEADER, Router, RouterError

__all__ = [
    "ROUTED_VERSION_HEADER",
    "ArchiveError",
    "CanaryConfig",
    "IstioConfig",
    "ModelArchive",
    "NginxConfig",
    "Router",
    "RouterError",
    "ServingBackend",
    "ServingConfig",
    "ServingError",
    "Upstream",
    "VersionCounters",
    "VersionInfo",
    "build_archive",
    "verify_archive",
]
