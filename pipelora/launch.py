"""How ranks find each other: the contract between the chart's launcher and the trainer's ranks.

The MPI Operator mounts the hostfile at this path in the launcher pod; the trainer reads it to
find rank 0's host (MASTER_ADDR) when Open MPI does not say, and the chart passes it to mpirun
explicitly (Open MPI 5 ignores the operator's `OMPI_MCA_orte_*` variables).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CLUSTER_HOSTFILE = "/etc/mpi/hostfile"
MASTER_PORT = 29500

# A worker pod's own scratch folder (an emptyDir the chart mounts): the worker entrypoint (PID 1)
# and the ranks that sshd starts in the same container meet here. Nothing in it outlives the pod.
# Tests and custom images move it with PIPELORA_POD_RUNTIME_DIR (an sshd SetEnv reaches the ranks).
POD_RUNTIME_DIR = "/run/pipelora"
RUNTIME_DIR_ENV = "PIPELORA_POD_RUNTIME_DIR"
# The variable that tells a rank where to relay its lines (set by the launcher's mpirun -x).
RELAY_DIR_ENV = "PIPELORA_RANK_RELAY_DIR"


def pod_runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(RUNTIME_DIR_ENV, POD_RUNTIME_DIR))


def pod_env_file(runtime: Path) -> Path:
    """The pod's environment as the entrypoint saw it, for ranks that ssh started without it."""
    return runtime / "pod-env.json"


def rank_relay_dir(runtime: Path) -> Path:
    """Each rank appends its lines to `rank-<RRRRR>.log` here; the entrypoint relays them."""
    return runtime / "ranks"


def ready_file(runtime: Path) -> Path:
    """Present once sshd listens: the readiness probe tests it (a TCP probe logs two sshd lines)."""
    return runtime / "ready"

# The port the workers' sshd listens on (the image's sshd_config; the chart's worker.sshPort).
SSH_PORT = 2222
