"""A stage's memory while it trains, against what `plan` predicted for it.

Measured: the rank's peak (accelerator memory on GPUs, resident memory on CPU) minus what the
built stage held just before its first step. Predicted: the same part of the stage's peak in
`pipelora.trainer.memory` (activations of the micro-batches in flight under 1F1B, DeepSpeed's
buffers, the largest backward's working memory, LoRA gradients and AdamW's moments). Each rank
prints both once training ends, so a user sees how far each stage is from the plan.
"""

from __future__ import annotations

import os

import torch

from pipelora.trainer.memory import GIB, ModelShape, RunShape, estimate_stages
from pipelora.trainer.plan import Plan
from pipelora.trainer.progress import peak_memory_gib

__all__ = ["StageMemory", "memory_in_use_gib", "predicted_training_bytes"]


def memory_in_use_gib() -> float:
    """Memory this rank holds now: allocated accelerator memory on GPUs, resident memory on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_allocated() / GIB
    with open("/proc/self/statm", encoding="ascii") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / GIB


def predicted_training_bytes(plan_: Plan) -> int:
    """The stage's predicted peak less what exists before the first step (weights, LoRA weights)."""
    device = "cuda" if plan_.device.type == "cuda" else "cpu"
    run = RunShape.from_spec(plan_.spec, device=device)
    estimate = estimate_stages(ModelShape.from_config(plan_.config), run, plan_.partition.bounds)[plan_.stage]
    return estimate.peak_bytes - estimate.weight_bytes - estimate.reserve_bytes - 4 * estimate.lora_params


class StageMemory:
    """Taken just before the first step; `line()` once training ends."""

    def __init__(self, plan_: Plan) -> None:
        self.plan = plan_
        self.built_gib = memory_in_use_gib()
        self.predicted_gib = predicted_training_bytes(plan_) / GIB
        self.in_flight = min(plan_.partition.stages - plan_.stage, plan_.spec.parallel.micro_batches)

    def line(self) -> str:
        peak = peak_memory_gib()
        return (f"{self.plan.tag} memory: peak {peak:.3f}GiB, {peak - self.built_gib:.3f}GiB above the built stage; "
                f"plan predicted {self.predicted_gib:.3f}GiB for its activations ({self.in_flight} micro-batch"
                f"{'es' if self.in_flight != 1 else ''} in flight), buffers, LoRA gradients and optimizer state")
