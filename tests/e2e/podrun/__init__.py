"""Run a rendered pipelora release pod by pod in podman, as the MPI Operator v0.8.2 and the kubelet would.

No Kubernetes API server can run on these machines, but a container engine can: `Cluster` takes
the objects `pipelora-k8s render` prints and runs them as containers of the trainer image. See
`cluster` for the controllers, `operator` for what the MPI Operator makes of an MPIJob, `kubelet`
for what becomes of a Pod, and `apiserver` for the API calls the release's own pods make.
"""

from . import operator
from .cluster import Cluster, ClusterError, IrsaWebhook, Network, Outcome
from .engine import EngineError, Podman, cannot_run_containers

__all__ = ["Cluster", "ClusterError", "EngineError", "IrsaWebhook", "Network", "Outcome", "Podman", "operator",
           "cannot_run_containers"]
