"""The final adapter in PEFT format, so `PeftModel.from_pretrained(base, dir)` loads it as is."""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from pipelora.storage import Storage, join_uri

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def adapter_config(*, base_model: str, r: int, alpha: float, dropout: float, targets: list[str]) -> dict[str, Any]:
    """PEFT's own LoraConfig, serialised as `save_pretrained` would (so every field is present)."""
    from peft import LoraConfig

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                     task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True)
    data = cfg.to_dict()
    data["target_modules"] = sorted(targets)
    return json.loads(json.dumps(data, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def write_adapter(storage: Storage, adapter_uri: str, *, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Weights first, then the config: a folder with adapter_config.json is complete."""
    clean = {k: v.detach().cpu().float().contiguous() for k, v in sorted(tensors.items())}
    storage.write_bytes(join_uri(adapter_uri, WEIGHTS), save_safetensors(clean, metadata={"format": "pt"}))
    storage.write_json(join_uri(adapter_uri, CONFIG), config)
