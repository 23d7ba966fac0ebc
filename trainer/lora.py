"""LoRA with PEFT's math, initialisation and state-dict names.

`y = W x + B(A(dropout(x))) * alpha / r`, with A kaiming-uniform and B zero as in PEFT, and the
submodules named `base_layer`, `lora_A`, `lora_B`, so a stage's LoRA tensors map one to one onto
`base_model.model.<hf name>.lora_A.weight` in a PEFT adapter. Our own module (rather than PEFT's
injection) lets each stage wrap only its layers and seed every adapter from its global name,
which makes the initial adapter independent of how the model is cut into stages.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from pipelora.families import known_linear_names
from pipelora.trainer.errors import TrainerError

# The linear layers of a supported decoder layer (the family table is pipelora.families); PEFT's
# `all-linear` means all of them (it excludes only the output layer, lm_head).
LINEAR_NAMES = known_linear_names()
PEFT_PREFIX = "base_model.model."


def resolve_targets(target_modules: str | list[str]) -> list[str]:
    """`all-linear` or a list of names → the sorted linear-layer names to adapt."""
    if target_modules == "all-linear":
        return sorted(LINEAR_NAMES)
    unknown = [t for t in target_modules if t not in LINEAR_NAMES]
    if unknown:
        raise TrainerError(
            f"lora.target_modules names {', '.join(unknown)}, which are not linear layers of a decoder layer; "
            f"use all-linear or some of {', '.join(LINEAR_NAMES)}"
        )
    return sorted(set(target_modules))


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (PEFT's `lora.Linear`, one adapter)."""

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float, seed: int) -> None:
        super().__init__()
        self.base_layer = base
        self.r = r
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=torch.float32, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=torch.float32, device=base.weight.device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            weight = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
            self.lora_A.weight.copy_(weight)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        lora_x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return result + (self.lora_B(self.lora_A(lora_x)) * self.scaling).to(result.dtype)


def adapter_seed(seed: int, name: str) -> int:
    """A seed per adapted module, from the run seed and the module's global (Hugging Face) name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def inject_lora(
    module: nn.Module, *, prefix: str, targets: Iterable[str], r: int, alpha: float, dropout: float, seed: int
) -> int:
    """Wrap every `nn.Linear` under `module` whose attribute name is in `targets`; return how many."""
    wanted = set(targets)
    count = 0
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in wanted and isinstance(child, nn.Linear):
                full = ".".join(p for p in (prefix, parent_name, child_name) if p)
                setattr(parent, child_name, LoraLinear(child, r=r, alpha=alpha, dropout=dropout,
                                                       seed=adapter_seed(seed, full)))
                count += 1
    return count
