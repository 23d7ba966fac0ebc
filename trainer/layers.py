"""The pipeline's layers: embedding, decoder layers, final norm + LM head, built one at a time.

Each layer is constructed on the meta device and then filled with only its own tensors from the
checkpoint, so a rank never materialises layers another stage owns. Between stages travels the
tuple (hidden state, position_ids): block-diagonal causal masks and RoPE are recomputed in each
layer from the integer position_ids (DeepSpeed would otherwise try to backpropagate through
every floating-point tensor it sends), and the hidden state leaving the frozen embedding is made
to require grad so that gradients reach the LoRA weights of the first stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipelora.families import family_of, layer_type, layer_window
from pipelora.rows import IGNORE_INDEX
from pipelora.trainer.attention import layer_mask
from pipelora.trainer.compat import call_decoder_layer, family_classes, rotary_embedding
from pipelora.trainer.lora import PEFT_PREFIX, inject_lora
from pipelora.trainer.weights import CheckpointReader


@dataclass(frozen=True)
class LoraSettings:
    targets: tuple[str, ...]
    r: int
    alpha: float
    dropout: float
    seed: int


def _materialise(module: nn.Module, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype,
                 device: torch.device) -> nn.Module:
    module = module.to(dtype=dtype).to_empty(device=device)
    module.load_state_dict(tensors, strict=True)
    module.requires_grad_(False)
    return module


def _load(reader: CheckpointReader, prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    names = [f"{prefix}.{k}" for k in module.state_dict()]
    got = reader.read(names)
    return {k[len(prefix) + 1 :]: v for k, v in got.items()}


class EmbeddingPipe(nn.Module):
    """input_ids → hidden state (requires grad, so the frozen embedding does not cut the graph).

    Families that scale the embedding (Gemma) multiply by sqrt(hidden_size) cast to the weight's
    dtype, exactly as their transformers embedding does.
    """

    def __init__(self, config: Any, reader: CheckpointReader, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        family = family_of(config)
        self.hf_prefix = family.embedding
        with torch.device("meta"):
            embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens = _materialise(embed, _load(reader, self.hf_prefix, embed), dtype=dtype, device=device)
        self.scale = float(config.hidden_size) ** 0.5 if family.embedding_scaled else None

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, position_ids = inputs
        hidden = self.embed_tokens(input_ids.long())
        if self.scale is not None:  # the embedding's output has its weight's dtype
            hidden = hidden * torch.tensor(self.scale, dtype=hidden.dtype, device=hidden.device)
        if torch.is_grad_enabled() and not hidden.requires_grad:
            hidden.requires_grad_(True)
        return hidden, position_ids.long()


class DecoderPipe(nn.Module):
    """One Hugging Face decoder layer with LoRA, its mask and RoPE recomputed from position_ids.

    The mask is the intersection of causality, the packed sequence and the layer's own window
    (sliding layers of Mistral, Gemma and Qwen), so a window never reaches into the previous
    sequence of a packed row either; its form (dense or a flex BlockMask) is the kernel's
    (`pipelora.trainer.attention`).
    """

    def __init__(self, config: Any, layer_idx: int, reader: CheckpointReader, dtype: torch.dtype,
                 device: torch.device, lora: LoraSettings, activation_checkpointing: bool = False) -> None:
        super().__init__()
        family = family_of(config)
        layer_cls, _, rotary_cls = family_classes(config)
        self.hf_prefix = f"{family.layers}.{layer_idx}"
        self.config = config
        with torch.device("meta"):
            layer = layer_cls(config, layer_idx)
        self.layer = _materialise(layer, _load(reader, self.hf_prefix, layer), dtype=dtype, device=device)
        inject_lora(self.layer, prefix=self.hf_prefix, targets=lora.targets, r=lora.r, alpha=lora.alpha,
                    dropout=lora.dropout, seed=lora.seed)
        self.layer.to(device)
        self.rotary = rotary_cls(config=config).to(device)
        self.rope_layer_type = layer_type(config, layer_idx) if family.rope_per_layer_type else None
        self.sliding_window = layer_window(config, layer_idx)
        self.activation_checkpointing = activation_checkpointing

    def _run(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        mask = layer_mask(self.config, position_ids, sliding_window=self.sliding_window, dtype=hidden.dtype)
        cos_sin = rotary_embedding(self.rotary, hidden, position_ids, layer_type=self.rope_layer_type)
        return call_decoder_layer(self.layer, hidden, attention_mask=mask, position_ids=position_ids, rope=cos_sin)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, position_ids = inputs
        if self.activation_checkpointing and torch.is_grad_enabled():
            hidden = checkpoint(self._run, hidden, position_ids, use_reentrant=False)
        else:
            hidden = self._run(hidden, position_ids)
        return hidden, position_ids


class HeadPipe(nn.Module):
    """Final norm + LM head → logits.

    With `tie_word_embeddings` the head is the embedding matrix, read here from the embedding's
    own tensor (this stage reads it even though another stage embeds the inputs); families that
    cap their logits (Gemma 2) apply `cap * tanh(logits / cap)`.
    """

    def __init__(self, config: Any, reader: CheckpointReader, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        family = family_of(config)
        _, norm_cls, _ = family_classes(config)
        self.hf_prefix = family.head
        with torch.device("meta"):
            norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
            head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.norm = _materialise(norm, _load(reader, family.norm_weights, norm), dtype=dtype, device=device)
        source = head_weight_name(config)
        weight = reader.read([source])[source]
        self.lm_head = _materialise(head, {"weight": weight}, dtype=dtype, device=device)
        cap = getattr(config, "final_logit_softcapping", None) if family.logit_softcap else None
        self.softcap = float(cap) if cap else None

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, _ = inputs
        logits: torch.Tensor = self.lm_head(self.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def head_weight_name(config: Any) -> str:
    """The checkpoint tensor the LM head reads: the embedding's when the weights are tied."""
    family = family_of(config)
    if getattr(config, "tie_word_embeddings", False):
        return f"{family.embedding}.weight"
    return f"{family.head}.weight"


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens (labels aligned with inputs, HF-style)."""
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:].long()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (target != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def lora_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable LoRA tensors of a stage's layers under their PEFT adapter names."""
    out: dict[str, torch.Tensor] = {}
    for layer in module.modules():
        if isinstance(layer, DecoderPipe):
            for name, param in layer.layer.named_parameters():
                if param.requires_grad:
                    out[f"{PEFT_PREFIX}{layer.hf_prefix}.{name}"] = param
    return out


def build_layer(item: int, *, config: Any, reader: CheckpointReader, dtype: torch.dtype, device: torch.device,
                lora: LoraSettings, activation_checkpointing: bool = False) -> nn.Module:
    """Pipeline item `item`: 0 is the embedding, 1..n the decoder layers, n+1 the norm and head."""
    n = config.num_hidden_layers
    if item == 0:
        return EmbeddingPipe(config, reader, dtype, device)
    if item == n + 1:
        return HeadPipe(config, reader, dtype, device)
    return DecoderPipe(config, item - 1, reader, dtype, device, lora, activation_checkpointing)


class LocalModel(nn.Module):
    """All pipeline items in one process: for inference checks and single-process use."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.items = nn.ModuleList(layers)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x: Any = (input_ids, position_ids)
        for layer in self.items:
            x = layer(x)
        return x
