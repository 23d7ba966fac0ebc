"""The whole pipeline in one process: the trainer's own forward pass, for checks and inference.

Built from the same layer classes as the pipeline stages, so what it computes is what the
stages compute; loading an exported adapter into it gives the trainer's logits to compare with
PEFT's.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors

from pipelora.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pipelora.storage import Storage, join_uri
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.layers import LocalModel, LoraSettings, build_layer, lora_state
from pipelora.trainer.weights import CheckpointReader, read_model_config


def build_local_model(storage: Storage, model_uri: str, *, lora: LoraSettings,
                      dtype: torch.dtype = torch.float32, device: str = "cpu") -> LocalModel:
    config = read_model_config(storage, model_uri)
    reader = CheckpointReader(storage, model_uri)
    layers = [build_layer(i, config=config, reader=reader, dtype=dtype, device=torch.device(device), lora=lora)
              for i in range(config.num_hidden_layers + 2)]
    return LocalModel(layers)


def load_local_adapter(storage: Storage, model_uri: str, adapter_uri: str, *, dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> LocalModel:
    """The base model with an exported adapter's LoRA weights (r, alpha, targets from its config)."""
    cfg = storage.read_json(join_uri(adapter_uri, ADAPTER_CONFIG))
    lora = LoraSettings(tuple(cfg["target_modules"]), int(cfg["r"]), float(cfg["lora_alpha"]), 0.0, 0)
    model = build_local_model(storage, model_uri, lora=lora, dtype=dtype, device=device)
    weights = load_safetensors(storage.read_bytes(join_uri(adapter_uri, ADAPTER_WEIGHTS)))
    params = lora_state(model)
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights))[:3]
        raise TrainerError(f"the adapter at {adapter_uri} does not match the model (missing e.g. {missing})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    return model.eval()
