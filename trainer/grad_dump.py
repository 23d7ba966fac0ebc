"""`PIPELORA_GRAD_DUMP=<folder>`: write each stage's first-step LoRA gradients, for debugging.

Set on a run that starts from step 0, the first data-parallel replica of every stage writes
`<folder>/stage-SS.safetensors` (SS: the stage, from 00) on its rank's machine: the stage's LoRA
gradients of the first optimizer step under their PEFT adapter names, as backward left them,
before clipping. The files of all stages together hold the whole model's first-step gradients,
so the same job cut into different numbers of stages (or run through transformers + PEFT) can be
compared tensor by tensor; that is how a pipeline cut is shown not to change what is learned.
A resumed run writes nothing (its first step is not the run's).

DeepSpeed's pipeline engine runs the backward passes and the optimizer step inside one
`train_batch` call, so the dump is hooked in front of the optimizer's step (torch's public step
pre-hook), the one moment when the gradients are complete and not yet clipped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

ENV_VAR = "PIPELORA_GRAD_DUMP"


def dump_name(stage: int) -> str:
    return f"stage-{stage:02d}.safetensors"


class FirstStepGradDump:
    """An optimizer step pre-hook that writes the LoRA gradients once (the first step it sees)."""

    def __init__(self, folder: str, *, stage: int, lora: Mapping[str, torch.Tensor]) -> None:
        self.path: str = os.path.join(folder, dump_name(stage))
        self.lora: Mapping[str, torch.Tensor] = lora
        self.written: bool = False

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.written:  # an optimizer whose step calls a hooked parent step sees the hook twice
            return
        self.written = True
        from safetensors.torch import save_file

        grads = {k: v.grad.detach().cpu().contiguous() for k, v in self.lora.items() if v.grad is not None}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        save_file(grads, self.path)


def arm(optimizer: torch.optim.Optimizer, *, lora: Mapping[str, torch.Tensor], stage: int, dp_rank: int,
        env: Mapping[str, str] | None = None) -> RemovableHandle | None:
    """Hook the dump in front of `optimizer`'s next step when the option is set (and this rank is
    its stage's first replica); remove the returned handle once the first step is done."""
    folder = (os.environ if env is None else env).get(ENV_VAR)
    if not folder or dp_rank != 0:
        return None
    return optimizer.register_step_pre_hook(FirstStepGradDump(folder, stage=stage, lora=lora))
