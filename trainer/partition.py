"""Cut the pipeline items (embedding, decoder layers, norm + LM head) into stages that are balanced
in time and fit in memory.

Balanced by training FLOPs per token, not by parameter count: a 32000-word LM head costs as much
as several small decoder layers, while the embedding costs almost nothing but holds as many
weights as the head. Memory weighs in as a constraint: under 1F1B the first stage holds
activations of `stages` micro-batches, the last of one, so the fastest cut can leave the first
stage over the GPU's memory; the cut minimises the slowest stage's time among cuts whose every
stage's predicted peak fits, and among equally fast cuts takes the one with the smallest peak
(`pipelora.trainer.memory`). Every stage gets at least one decoder layer (so every stage trains
LoRA weights), which is why a pipeline cannot have more stages than the model has decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pipelora.trainer.errors import TrainerError
from pipelora.trainer.memory import (
    GIB,
    RESERVE_BYTES,
    Device,
    ModelShape,
    RunShape,
    cut,
    describe,
    env_gpu_memory_bytes,
    estimate_stages,
    item_label,
)
from pipelora.trainer.memory import item_costs as _item_costs


@dataclass(frozen=True)
class Partition:
    bounds: tuple[int, ...]  # stage s owns items [bounds[s], bounds[s+1])
    costs: tuple[float, ...]  # per item: training FLOPs per token
    num_layers: int
    peaks: tuple[int, ...] = ()  # predicted peak bytes per stage, when the run's shape is known
    budget: int | None = None  # the memory every stage had to fit, bytes
    fits: bool = True  # False: no cut fits `budget`; this is the cut with the smallest peak

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    def items(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stage_cost(self, stage: int) -> float:
        return sum(self.costs[i] for i in self.items(stage))

    def item_name(self, item: int) -> str:
        return item_label(item, self.num_layers)

    def describe(self, stage: int) -> str:
        return describe(self.bounds[stage], self.bounds[stage + 1], self.num_layers)

    def table(self) -> str:
        total = sum(self.costs)
        memory = bool(self.peaks)
        header = "stage  items                              est. GFLOP/token  share"
        if memory:
            header += "  pred. peak GiB"
        lines = [header]
        for s in range(self.stages):
            cost = self.stage_cost(s)
            line = f"{s + 1:>5}  {self.describe(s):<34} {cost / 1e9:>16.4f}  {cost / total:>5.1%}"
            if memory:
                line += f"  {self.peaks[s] / GIB:>14.2f}"
            lines.append(line)
        if self.budget is not None:
            if self.fits:
                lines.append(f"every stage's predicted peak fits {self.budget / GIB:.2f} GiB")
            else:
                lines.append(f"no cut fits {self.budget / GIB:.2f} GiB per rank; this cut has the smallest peak "
                             "(see `pipelora-k8s plan`)")
        return "\n".join(lines)


def item_costs(config: Any, *, seq_len: int) -> list[float]:
    """Training FLOPs per token of each item (forward and backward; LoRA r=16 on every linear layer)."""
    return [item.flops for item in _item_costs(ModelShape.from_config(config), RunShape(seq_len=seq_len))]


def _check_stages(stages: int, layers: int) -> None:
    if stages > layers:
        raise TrainerError(
            f"parallel.stages is {stages} but the model has {layers} decoder layer{'s' if layers != 1 else ''}; "
            f"use at most {layers} stages"
        )


def memory_aware_partition(model: ModelShape, run: RunShape, *, budget_bytes: int | None,
                           reserve_bytes: int | None = None) -> Partition:
    """The fastest cut whose every stage's predicted peak (1F1B in-flight activations included)
    fits `budget_bytes` (None: the fastest cut, the smallest peak among equally fast ones)."""
    _check_stages(run.stages, model.layers)
    reserve = RESERVE_BYTES[run.device] if reserve_bytes is None else reserve_bytes
    items = _item_costs(model, run)
    bounds, fits = cut(items, run, hidden=model.hidden, budget_bytes=budget_bytes, reserve_bytes=reserve)
    peaks = tuple(s.peak_bytes for s in estimate_stages(model, run, bounds, reserve_bytes=reserve))
    return Partition(bounds, tuple(i.flops for i in items), model.layers, peaks=peaks, budget=budget_bytes, fits=fits)


def device_budget(device: Device, spec_gib: float | None = None) -> int | None:
    """The memory a stage must fit on this rank: `PIPELORA_GPU_MEMORY_GIB`, else (on a GPU) the spec's
    `cluster.gpu_memory_gib`, else the GPU's memory in whole GiB (rounded down, so that ranks on GPUs
    of one model agree), else none (CPU: a local run is not held to the cluster's GPUs)."""
    budget = env_gpu_memory_bytes()
    if budget is None and spec_gib is not None and device == "cuda":
        budget = int(spec_gib * GIB)
    if budget is not None or device != "cuda":
        return budget
    import torch

    return torch.cuda.get_device_properties(0).total_memory // GIB * GIB


def balanced_partition(config: Any, *, stages: int, seq_len: int, spec: Any = None) -> Partition:
    """Contiguous split minimising the slowest stage, one decoder layer per stage at least.

    With the job's `spec`, also memory-aware: every stage's predicted peak must fit the rank's
    memory (`device_budget`), and the table shows each stage's predicted peak.
    """
    model = ModelShape.from_config(config)
    _check_stages(stages, model.layers)
    if spec is None:
        run = RunShape(seq_len=seq_len, stages=stages)
        items = _item_costs(model, run)
        bounds, _ = cut(items, run, hidden=model.hidden, budget_bytes=None)
        return Partition(bounds, tuple(i.flops for i in items), model.layers)
    import torch

    device: Device = "cuda" if torch.cuda.is_available() else "cpu"
    run = replace(RunShape.from_spec(spec, device=device), stages=stages, seq_len=seq_len)
    return memory_aware_partition(model, run, budget_bytes=device_budget(device, spec.cluster.gpu_memory_gib))
