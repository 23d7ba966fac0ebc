"""Everything a rank decides before the process group forms, identically on every rank.

Every check a user can fail (world size, model files, stage count, data) happens here, before any
collective call, so each rank reports the same one error and exits instead of some ranks waiting
forever for others that already failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipelora.config import JobSpec
from pipelora.hub import model_storage_uri
from pipelora.storage import storage_for
from pipelora.trainer.attention import use_kernel
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.lora import resolve_targets
from pipelora.trainer.partition import Partition, balanced_partition
from pipelora.trainer.ranks import RankInfo, discover
from pipelora.trainer.weights import CheckpointReader, read_model_config


@dataclass
class Plan:
    """Everything decided before the process group forms (identical on every rank)."""

    spec: JobSpec
    info: RankInfo
    config: Any
    partition: Partition
    targets: list[str]
    stage: int
    dp_rank: int
    device: torch.device
    dtype: torch.dtype
    manifest: dict[str, Any]
    reader: CheckpointReader

    @property
    def tag(self) -> str:
        return (f"[stage {self.stage + 1}/{self.partition.stages} dp {self.dp_rank}/"
                f"{self.spec.parallel.data_parallel}]")

    @property
    def is_first(self) -> bool:
        """This rank's stage reads the inputs."""
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        """This rank's stage computes the loss, so it reads the labels."""
        return self.stage == self.partition.stages - 1

    @property
    def eval_rows(self) -> int:
        return int(self.manifest.get("splits", {}).get("eval", {}).get("rows", 0) or 0)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def plan(spec: JobSpec, info: RankInfo | None = None) -> Plan:
    """Validate the job against the launch, the model and the data; no collective calls."""
    info = info or discover()
    p = spec.parallel
    if info.world_size != p.world_size:
        raise TrainerError(
            f"the launcher started {info.world_size} rank{'s' if info.world_size != 1 else ''} but the spec asks for "
            f"parallel.nodes x parallel.gpus_per_node = {p.nodes} x {p.gpus_per_node} = {p.world_size}; "
            f"start {p.world_size} ranks (mpirun -np {p.world_size}) or change the spec"
        )
    # An hf:// model is read from its committed mirror in storage (recorded by dataprep), never from the Hub.
    model_uri = model_storage_uri(spec)
    model_storage = storage_for(spec, model_uri)
    config = read_model_config(model_storage, model_uri)
    targets = resolve_targets(spec.lora.target_modules)
    partition = balanced_partition(config, stages=p.stages, seq_len=spec.dataset.seq_len, spec=spec)
    reader = CheckpointReader(model_storage, model_uri)  # fails here, on every rank, without weights
    layout = spec.layout
    manifest = storage_for(spec, layout.data).read_marker(layout.manifest)
    if manifest is None:
        raise TrainerError(f"no prepared data at {layout.data}: run dataprep first (pipelora-k8s dataprep --config ...)")
    if int(manifest.get("seq_len", -1)) != spec.dataset.seq_len:
        raise TrainerError(
            f"the data at {layout.data} has seq_len {manifest.get('seq_len')} but dataset.seq_len is "
            f"{spec.dataset.seq_len}; run dataprep again with --overwrite"
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    use_kernel(config, device)  # flex attention on packed rows on CUDA, dense masks elsewhere
    stage, dp_rank = p.stage_of_rank(info.rank)
    return Plan(spec, info, config, partition, targets, stage, dp_rank, device, _dtype(spec.training.dtype, device),
                manifest, reader)
