"""The final adapter in PEFT format, so `PeftModel.from_pretrained(base, dir)` loads it as is."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from pipelora.layout import ADAPTER_COMPLETE_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pipelora.storage import ObjectInfo, Storage, join_uri


def adapter_config(*, base_model: str, r: int, alpha: float, dropout: float, targets: list[str]) -> dict[str, Any]:
    """PEFT's own LoraConfig, serialised as `save_pretrained` would (so every field is present)."""
    from peft import LoraConfig

    # PEFT annotates lora_alpha as int but scales by any number; the spec's alpha is kept as given.
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),  # type: ignore[arg-type]
                     bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True)
    data = cfg.to_dict()
    data["target_modules"] = sorted(targets)
    return json.loads(json.dumps(data, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def write_adapter(storage: Storage, adapter_uri: str, *, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write the adapter folder with the file that marks it complete (`ADAPTER_COMPLETE_FILE`) last,
    so a reader never takes a half-written adapter for a finished one."""
    clean = {k: v.detach().cpu().float().contiguous() for k, v in sorted(tensors.items())}
    weights = save_safetensors(clean, metadata={"format": "pt"})
    writes: dict[str, Callable[[str], ObjectInfo]] = {
        ADAPTER_WEIGHTS: lambda uri: storage.write_bytes(uri, weights),
        ADAPTER_CONFIG: lambda uri: storage.write_json(uri, config),
    }
    for name in sorted(writes, key=lambda n: n == ADAPTER_COMPLETE_FILE):
        writes[name](join_uri(adapter_uri, name))
