"""Random-weight models in Hugging Face layout, written shard by shard.

Tensors are generated one at a time and flushed whenever a shard is full, so even the 7B shape
needs about one shard of memory; each tensor's values depend only on the seed and its name, so a
model is reproducible whatever the shard size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipelora.trainer.presets import Family, Preset, preset_config
from pipelora.trainer.weights import INDEX, SINGLE


def parameter_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a causal-LM checkpoint of `config` holds, in model order."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    if getattr(config, "tie_word_embeddings", False):
        names = [(n, s) for n, s in names if n != "lm_head.weight"]
    return names


def _random_tensor(name: str, shape: tuple[int, ...], *, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1 and "norm" in name:  # RMSNorm scales start at one; biases (Qwen's q/k/v) are random
        return torch.ones(shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std).to(dtype)


def _shards(tensors: Iterator[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    current: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            yield current
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        yield current


def write_random_model(
    out: str | Path,
    *,
    family: Family,
    preset: Preset,
    seed: int = 0,
    weights: bool = True,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write config.json, the Mistral tokenizer and (unless `weights` is false) random safetensors.

    `overrides` sets config attributes on top of the preset (`tie_word_embeddings`, a window...).
    """
    from pipelora.dataprep.tokenizer import write_mistral_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = preset_config(family, preset)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    dtype = dtype or (torch.bfloat16 if preset == "7b" else torch.float32)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out)
    write_mistral_tokenizer(out)
    if not weights:
        return out
    shapes = parameter_shapes(config)
    std = float(getattr(config, "initializer_range", 0.02))
    tensors = ((n, _random_tensor(n, s, seed=seed, std=std, dtype=dtype)) for n, s in shapes)
    files: list[tuple[str, list[str], int]] = []
    tmp_names: list[Path] = []
    for i, shard in enumerate(_shards(tensors, max_shard_bytes)):
        path = out / f".shard-{i:05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        path.chmod(0o644)
        tmp_names.append(path)
        files.append((path.name, list(shard), sum(t.numel() * t.element_size() for t in shard.values())))
        del shard
    if len(files) == 1:
        tmp_names[0].replace(out / SINGLE)
        (out / INDEX).unlink(missing_ok=True)
        return out
    total = len(files)
    weight_map: dict[str, str] = {}
    for i, (tmp, names, _) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        (out / tmp).replace(out / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": sum(f[2] for f in files)}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (out / SINGLE).unlink(missing_ok=True)
    return out
