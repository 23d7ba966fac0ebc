"""The model families the trainer supports, and the linear layers LoRA may adapt in each.

One table serves the spec and the trainer: the spec rejects a `lora.target_modules` name that no
family has (and, once the model's `config.json` is read, one its own family lacks), and the
trainer wraps exactly these layers, so a name the spec accepts is one the trainer finds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "LINEAR_NAMES",
    "known_linear_names",
    "model_problems",
    "supported_model_types",
    "unknown_targets",
]

_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# config.json's `model_type` → the `nn.Linear` attribute names of one decoder layer, in layer order.
# PEFT's `all-linear` means all of them (it leaves out only the output layer, lm_head).
LINEAR_NAMES: dict[str, tuple[str, ...]] = {
    "mistral": _LLAMA_LINEARS,
    "llama": _LLAMA_LINEARS,
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(LINEAR_NAMES)


def known_linear_names() -> tuple[str, ...]:
    """Every family's linear names, each once, in table order: what a spec may name before the
    model is known."""
    return tuple(dict.fromkeys(name for names in LINEAR_NAMES.values() for name in names))


def unknown_targets(target_modules: str | Sequence[str], names: Sequence[str]) -> list[str]:
    """The names in a list-valued `lora.target_modules` that are not in `names` (none for all-linear)."""
    if isinstance(target_modules, str):
        return []
    return [t for t in dict.fromkeys(target_modules) if t not in names]


def model_problems(config: Mapping[str, Any], target_modules: str | Sequence[str], *, where: str) -> list[str]:
    """One sentence per way the spec's LoRA targets do not fit the model whose `config.json`
    (found at `where`) is `config`."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in LINEAR_NAMES:
        supported = " or ".join(supported_model_types())
        return [
            f"model.uri: {where} has model_type '{model_type}', which the trainer does not support; "
            f"point model.uri at a {supported} model"
        ]
    names = LINEAR_NAMES[model_type]
    missing = unknown_targets(target_modules, names)
    if missing:
        return [
            f"lora.target_modules names {', '.join(missing)}, which a {model_type} decoder layer does not have "
            f"(model {where}); use all-linear or some of {', '.join(names)}"
        ]
    return []
