"""Serving: model archives, the TorchServe backend, and the routers that split traffic between versions.

* :mod:`pipeline.serving.handler` -- the TorchServe handler (self-contained, packaged in the .mar)
* :mod:`pipeline.serving.pyfunc_model` -- the MLflow pyfunc wrapper (self-contained, copied into each model)
* :mod:`pipeline.serving.archive` -- ``build_archive`` / ``verify_archive`` (torch-model-archiver)
* :mod:`pipeline.serving.backend` -- the ``ServingBackend`` interface
* :mod:`pipeline.serving.torchserve` -- ``TorchServe``: lifecycle + management API on 127.0.0.1
* :mod:`pipeline.serving.router` -- the ``Router`` interface, routed requests, weight checks
* :mod:`pipeline.serving.nginx` -- ``NginxRouter`` (embedded default; ``templates/nginx.conf.j2``)
* :mod:`pipeline.serving.istio` -- ``IstioRouter`` (VirtualService weights via the Kubernetes API)
* :mod:`pipeline.serving.service` -- backend + router from ``config.serving``; status and stop
* :mod:`pipeline.serving.state` -- the serving state that outlives runs (production, previous, archives)
* :mod:`pipeline.serving.ports` -- ``free_port``

Its configuration is ``serving:`` / ``canary:`` in :mod:`pipeline.config`. The canary itself
(stage ``deploy``) is :mod:`pipeline.stages.deploy`. Importing this package imports nothing
else; import the submodules directly.
"""
