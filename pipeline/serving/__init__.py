"""Serving: model archives, the TorchServe backend, and the canary routers.

* :mod:`pipeline.serving.handler` -- the TorchServe handler (self-contained, packaged in the .mar)
* :mod:`pipeline.serving.archive` -- ``build_archive`` / ``verify_archive`` (torch-model-archiver)
* :mod:`pipeline.serving.backend` -- the ``ServingBackend`` interface
* :mod:`pipeline.serving.torchserve` -- ``TorchServe``: lifecycle + management API on 127.0.0.1
* :mod:`pipeline.serving.router` -- the ``Router`` interface and ``NginxRouter``
* :mod:`pipeline.serving.istio` -- ``IstioRouter`` (VirtualService weights via the Kubernetes API)
* :mod:`pipeline.serving.config` -- ``ServingConfig`` / ``CanaryConfig``

The canary itself (stage ``deploy``) is :mod:`pipeline.stages.deploy.stage`. Importing this package imports
nothing else (``pipeline.config`` reads the section models from :mod:`pipeline.serving.config`
at DAG parse time); import the submodules directly.
"""

