"""A rank's side of checkpoints and the final adapter: resume, save and export.

Every method here is collective (every rank calls it, in the same order): rank 0 picks the
checkpoint to resume from and commits what every rank uploaded, so no rank can resume from, or
announce, a checkpoint another rank did not see whole.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelora.layout import RunLayout
from pipelora.storage import ObjectInfo, Storage
from pipelora.trainer import checkpoint as ckpt
from pipelora.trainer import compat
from pipelora.trainer.adapter import adapter_config, write_adapter
from pipelora.trainer.checkpoint import CheckpointMeta, History
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.plan import Plan
from pipelora.trainer.progress import emit
from pipelora.trainer.stage import StageModel


class Checkpointing:
    """Resume, save and export the state of one rank's stage."""

    def __init__(self, plan_: Plan, model: StageModel, storage: Storage) -> None:
        self.plan: Plan = plan_
        self.model: StageModel = model
        self.storage: Storage = storage
        self.layout: RunLayout = plan_.spec.layout
        self.rank: int = plan_.info.rank

    def resume(self) -> CheckpointMeta | None:
        """Load the newest committed checkpoint (chosen by rank 0 for everyone); None to start afresh."""
        import torch.distributed as dist

        choice: list[int | None] = [None]
        if self.rank == 0:
            steps = ckpt.committed_steps(self.storage, self.layout)
            choice = [steps[-1] if steps else None]
        dist.broadcast_object_list(choice, src=0)
        step = choice[0]
        if step is None:
            return None
        found = ckpt.open_committed(self.storage, self.layout, step)
        partition = self.plan.partition
        found.meta.check_compatible(stages=partition.stages, data_parallel=self.plan.spec.parallel.data_parallel,
                                    bounds=partition.bounds, where=found.folder)
        weights = found.lora(self.plan.stage)
        with torch.no_grad():
            for name, param in self.model.lora.items():
                if name not in weights:
                    raise TrainerError(f"checkpoint {found.folder} lacks {name}; the LoRA settings changed")
                param.copy_(weights[name].to(param.device))
        state = found.optim(self.plan.stage)
        self.model.optimizer.load_state_dict(state["optimizer"])
        self.model.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(found.rng(self.rank))
        compat.set_global_steps(self.model.engine, step)
        emit(f"{self.plan.tag} resumed from {found.folder} (step {step})")
        return found.meta

    def save(self, step: int, *, data_position: dict[str, int], losses: History, eval_losses: History) -> None:
        """Upload this rank's part; rank 0 commits once every rank's part is in place.

        `data_position` and the histories matter on rank 0 only (the marker is its to write).
        """
        import torch.distributed as dist

        plan_, model = self.plan, self.model
        files = ckpt.stage_files(stage=plan_.stage, rank=self.rank, write_stage=plan_.dp_rank == 0,
                                 lora=model.lora, optimizer=model.optimizer, scheduler=model.scheduler)
        infos = ckpt.upload(self.storage, self.layout, step, files)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [(i.uri, i.size, i.sha256) for i in infos])
        if self.rank == 0:
            objects = [ObjectInfo(*t) for part in gathered for t in part]
            meta = ckpt.new_meta(step=step, stages=plan_.partition.stages,
                                 data_parallel=plan_.spec.parallel.data_parallel, bounds=plan_.partition.bounds,
                                 data_position=data_position, losses=losses, eval_losses=eval_losses)
            ckpt.commit(self.storage, self.layout, objects, meta)
            removed = ckpt.prune(self.storage, self.layout, keep=plan_.spec.training.keep_checkpoints)
            emit(f"checkpoint step {step} committed at {self.layout.checkpoint(step)}"
                 + (f"; pruned {removed}" if removed else ""))
        dist.barrier()

    def export_adapter(self) -> None:
        """Gather every stage's LoRA weights on rank 0, which writes the PEFT adapter."""
        import torch.distributed as dist

        plan_ = self.plan
        payload = {k: v.detach().cpu() for k, v in self.model.lora.items()} if plan_.dp_rank == 0 else {}
        gathered: list[Any] | None = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        if gathered is not None:
            tensors: dict[str, torch.Tensor] = {}
            for part in gathered:
                tensors.update(part)
            lora = plan_.spec.lora
            config = adapter_config(base_model=plan_.spec.model.uri, r=lora.r, alpha=lora.alpha,
                                    dropout=lora.dropout, targets=plan_.targets)
            write_adapter(self.storage, self.layout.adapter, tensors=tensors, config=config)
            emit(f"adapter ({len(tensors)} tensors) written to {self.layout.adapter}")
        dist.barrier()
