"""A local multi-node Ray cluster on 127.0.0.1, like the KubeRay cluster of production in miniature.

``asr-retune cluster up|down|status``: a head node (the driver's; no CPUs for trials by default) and
``ray.cluster.workers`` worker nodes carrying the spot resource (``ray.spot_resource``), each a
``ray start --block`` process of its own, with the dashboard (state API, Ray Jobs) on the head.
``ray.address: auto`` connects the stages to it. :func:`kill_worker_node` removes a worker node as a spot
reclaim does (its raylet and every process on it), :func:`restart_worker_node` brings it back.

* :mod:`pipeline.cluster.plan` -- the nodes, their resources, ports and folders, each ``ray start``
* :mod:`pipeline.cluster.node` -- one node's processes: start, find, kill
* :mod:`pipeline.cluster.state` -- the record (``cluster.json``) and the nodes' environment and auth
* :mod:`pipeline.cluster.control` -- up, down, status, kill and restart a worker node
"""

from pipeline.cluster.control import (
    cluster_down,
    cluster_status,
    cluster_up,
    kill_worker_node,
    local_cluster_address,
    restart_worker_node,
    wait_for_node,
)
from pipeline.cluster.plan import (
    HEAD,
    NODE_LABEL,
    ClusterError,
    ClusterNotUp,
    ClusterSpec,
    cluster_spec,
    worker_name,
)
from pipeline.cluster.state import read_state

__all__ = [
    "HEAD", "NODE_LABEL", "ClusterError", "ClusterNotUp", "ClusterSpec", "cluster_down", "cluster_spec",
    "cluster_status", "cluster_up", "kill_worker_node", "local_cluster_address", "read_state", "restart_worker_node",
    "wait_for_node", "worker_name",
]
