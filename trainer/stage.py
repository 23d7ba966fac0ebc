"""What one rank trains: its stage's layers inside a DeepSpeed pipeline engine, their LoRA
parameters, the optimizer and the learning-rate schedule.

Built after the process group forms (DeepSpeed's pipeline module needs it), from what the plan
decided; each rank materialises only its own stage's layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from pipelora.config import JobSpec
from pipelora.trainer import compat
from pipelora.trainer.attention import kernel_of
from pipelora.trainer.layers import LoraSettings, lora_state
from pipelora.trainer.optim import ClippedAdamW
from pipelora.trainer.plan import Plan
from pipelora.trainer.progress import emit, peak_memory_gib
from pipelora.trainer.ranks import export_torch_env
from pipelora.trainer.schedule import lr_factor


@dataclass
class StageModel:
    """A rank's trainable state and the engine that runs it."""

    lora: dict[str, torch.Tensor]  # trainable LoRA parameters under their PEFT names
    optimizer: ClippedAdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    engine: Any  # deepspeed's PipelineEngine


def init_distributed(plan_: Plan) -> None:
    """Form the process group: NCCL on GPUs, gloo on CPU."""
    if plan_.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(plan_.device)
    export_torch_env(plan_.info)
    import deepspeed

    if plan_.device.type == "cpu" and os.environ.get("PIPELORA_DS_SHM_COMM", "0") != "1":
        compat.disable_shm_comm()
    deepspeed.init_distributed(dist_backend="nccl" if plan_.device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False)


def ds_config(spec: JobSpec) -> dict[str, Any]:
    """DeepSpeed's config: micro-batches per step from the spec; clipping is the optimizer's own."""
    p = spec.parallel
    return {
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.micro_batches,
        "train_batch_size": p.micro_batch_size * p.micro_batches * p.data_parallel,
        "gradient_clipping": 0.0,  # done by ClippedAdamW across all stages
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 0},
        "wall_clock_breakdown": False,
    }


def build_stage(plan_: Plan) -> StageModel:
    """This rank's layers (read from the model's weights), LoRA, optimizer, schedule and engine."""
    import deepspeed

    from pipelora.trainer.pipeline import layer_specs, pipeline_module

    spec = plan_.spec
    rank = plan_.info.rank
    base_mem = peak_memory_gib()  # the runtime alone (torch, DeepSpeed), before any layer exists
    torch.manual_seed(spec.training.seed)
    if rank == 0:
        emit(f"pipeline partition ({plan_.partition.stages} stages x {spec.parallel.data_parallel} data-parallel, "
             f"seq_len {spec.dataset.seq_len}):\n{plan_.partition.table()}")
    reader = plan_.reader
    lora = LoraSettings(tuple(plan_.targets), spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.training.seed)
    specs = layer_specs(plan_.config, reader, dtype=plan_.dtype, device=plan_.device, lora=lora,
                        activation_checkpointing=spec.training.activation_checkpointing)
    module = pipeline_module(specs, plan_.partition, data_parallel=spec.parallel.data_parallel)
    params_by_name = lora_state(module)
    params = list(params_by_name.values())
    t = spec.training
    optimizer = ClippedAdamW(params, lr=t.lr, weight_decay=t.weight_decay, max_norm=t.max_grad_norm,
                             data_parallel=spec.parallel.data_parallel)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=t.warmup_steps, total=t.max_steps, kind=t.schedule))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(spec))
    compat.release_last_stage_outputs(engine)
    emit(f"{plan_.tag} rank {rank}: {plan_.partition.describe(plan_.stage)}; "
         f"{sum(p.numel() for p in params)} LoRA parameters; read {reader.bytes_read / 1024**2:.1f} MiB of "
         f"weights from {spec.model.uri}; attention {kernel_of(plan_.config)}; base mem {base_mem:.2f}GiB")
    return StageModel(lora=params_by_name, optimizer=optimizer, scheduler=scheduler, engine=engine)
