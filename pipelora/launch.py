"""How ranks find each other: the contract between the chart's launcher and the trainer's ranks.

The MPI Operator mounts the hostfile at this path in the launcher pod; the trainer reads it to
find rank 0's host (MASTER_ADDR) when Open MPI does not say, and the chart passes it to mpirun
explicitly (Open MPI 5 ignores the operator's `OMPI_MCA_orte_*` variables).
"""

from __future__ import annotations

CLUSTER_HOSTFILE = "/etc/mpi/hostfile"
MASTER_PORT = 29500
