"""Who am I in the job: rank, world size and rendezvous address from the launcher's environment.

mpirun (Open MPI), MPICH/Intel MPI, torchrun and the deepspeed launcher each name these
differently; the MPI Operator's launcher passes a hostfile whose first host is rank 0's node
(its path and the rendezvous port are the launch contract, `pipelora.launch`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelora.launch import CLUSTER_HOSTFILE, MASTER_PORT

_RANK_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "MPI_LOCALRANKID"),
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(hostfile: str | Path) -> str | None:
    """The first host named in an MPI hostfile (`host slots=N` lines; comments ignored)."""
    try:
        text = Path(hostfile).read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line.split()[0].split(":")[0]
    return None


def discover(env: Mapping[str, str] | None = None) -> RankInfo:
    """Rank, world and rendezvous from the environment; a lone process is rank 0 of 1."""
    env = os.environ if env is None else env
    rank, world, local = 0, 1, 0
    for rank_var, size_var, local_var in _RANK_VARS:
        if rank_var in env and size_var in env:
            rank, world = int(env[rank_var]), int(env[size_var])
            local = int(env.get(local_var, rank))
            break
    addr = env.get("MASTER_ADDR")
    if not addr:
        hostfile = env.get("PIPELORA_HOSTFILE") or (CLUSTER_HOSTFILE if Path(CLUSTER_HOSTFILE).exists() else None)
        addr = (first_host(hostfile) if hostfile else None) or "127.0.0.1"
    port = int(env.get("MASTER_PORT") or MASTER_PORT)
    return RankInfo(rank=rank, world_size=world, local_rank=local, master_addr=addr, master_port=port)


def export_torch_env(info: RankInfo) -> None:
    """Set the variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
    os.environ.update(
        RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
        MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port),
    )
