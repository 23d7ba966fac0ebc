"""Attention over packed rows: which kernel a stage uses, and the mask each kernel takes.

Packing puts several sequences in one row, so attention must stay inside each sequence (and
inside a layer's sliding window). The dense path builds a boolean [batch, 1, seq, seq] mask per
layer: exact everywhere, but the mask keeps SDPA off its flash kernels and costs seq² memory.
The flex path hands PyTorch's `flex_attention` a `BlockMask` built from where each packed
sequence starts (position_ids == 0, the shard contract): tiles wholly outside every sequence are
skipped and no seq² tensor exists. Flex is chosen on CUDA (compiled there); the dense path stays
on CPU, where `flex_attention` has no backward pass. `PIPELORA_ATTENTION=dense|flex` overrides the
choice (for comparing the two; flex on CPU runs forward only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from pipelora.trainer import compat
from pipelora.trainer.errors import TrainerError

__all__ = [
    "ATTENTION_ENV",
    "DENSE",
    "FLEX",
    "FLEX_IMPLEMENTATION",
    "block_causal_mask",
    "choose_kernel",
    "flex_available",
    "kernel_of",
    "layer_mask",
    "use_kernel",
]

ATTENTION_ENV = "PIPELORA_ATTENTION"
DENSE = "dense"
FLEX = "flex"
FLEX_IMPLEMENTATION = "pipelora_flex"  # the name our flex function is registered under in transformers


def flex_available() -> bool:
    """Whether this torch has `flex_attention` (2.5 and newer)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def choose_kernel(device: torch.device) -> str:
    """flex on CUDA when torch has it, dense elsewhere; `PIPELORA_ATTENTION` overrides."""
    requested = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if requested not in ("auto", DENSE, FLEX):
        raise TrainerError(f"{ATTENTION_ENV}={requested!r} is not one of auto, dense, flex")
    if requested == DENSE:
        return DENSE
    if requested == FLEX:
        if not flex_available():
            raise TrainerError(f"{ATTENTION_ENV}=flex but this torch {torch.__version__} has no flex_attention")
        return FLEX
    return FLEX if device.type == "cuda" and flex_available() else DENSE


def use_kernel(config: Any, device: torch.device) -> str:
    """Set the attention kernel of layers built from `config` for `device`; returns its name."""
    kernel = choose_kernel(device)
    if kernel == FLEX:
        _register_flex()
        compat.set_attention_implementation(config, FLEX_IMPLEMENTATION)
    else:
        compat.set_attention_implementation(config, compat.attention_implementation(config))
    return kernel


def kernel_of(config: Any) -> str:
    """The kernel layers of `config` run: flex or dense."""
    return FLEX if compat.attention_implementation_of(config) == FLEX_IMPLEMENTATION else DENSE


def block_causal_mask(position_ids: torch.Tensor, *, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean [batch, 1, seq, seq] mask: causal, and confined to each packed sequence.

    A new sequence starts wherever position_ids == 0 (the shard contract), so attention never
    crosses from one packed example into another.
    """
    segments = _segments(position_ids)
    same = segments[:, :, None] == segments[:, None, :]
    seq = position_ids.shape[1]
    idx = torch.arange(seq, device=position_ids.device)
    allowed = idx[:, None] >= idx[None, :]
    if sliding_window is not None and sliding_window < seq:
        allowed = allowed & ((idx[:, None] - idx[None, :]) < sliding_window)
    return (same & allowed)[:, None, :, :]


def layer_mask(config: Any, position_ids: torch.Tensor, *, sliding_window: int | None, dtype: torch.dtype) -> Any:
    """The mask a decoder layer of `config` takes for these packed rows: a BlockMask for flex,
    the dense mask (boolean for sdpa, additive for eager) otherwise."""
    if kernel_of(config) == FLEX:
        return _cached_block_mask(position_ids, sliding_window)
    return compat.attention_mask(config, block_causal_mask(position_ids, sliding_window=sliding_window), dtype=dtype)


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Each token's packed-sequence index within its row."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=1)


# One stage's layers all see the same position_ids tensor of a micro-batch (each returns it as it
# came), so the BlockMask is built once per micro-batch and window; activation checkpointing's
# recomputation finds it too. Keeping a reference to the tensor means its storage cannot be reused
# by a later micro-batch while the identity check still holds.
_block_masks: dict[int | None, tuple[torch.Tensor, Any]] = {}


def _cached_block_mask(position_ids: torch.Tensor, sliding_window: int | None) -> Any:
    hit = _block_masks.get(sliding_window)
    if hit is not None and hit[0] is position_ids:
        return hit[1]
    mask = _block_mask(position_ids, sliding_window)
    _block_masks[sliding_window] = (position_ids, mask)
    return mask


def _block_mask(position_ids: torch.Tensor, sliding_window: int | None) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    segments = _segments(position_ids)
    batch, seq = position_ids.shape

    def packed_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        allowed = (segments[b, q] == segments[b, kv]) & (q >= kv)
        if sliding_window is not None and sliding_window < seq:
            allowed = allowed & (q - kv < sliding_window)
        return allowed

    return create_block_mask(packed_causal, batch, None, seq, seq, device=position_ids.device)


_compiled: dict[str, Callable[..., Any]] = {}


def _flex_kernel(device: torch.device) -> Callable[..., Any]:
    """flex_attention, compiled once per process on CUDA (eager flex is a slow reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["cuda"]


def _flex_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, scaling: float | None = None, softcap: float | None = None,
                            dropout: float = 0.0, **_: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over flex_attention with our BlockMask.

    The layer's sliding window is already in the mask; logit soft-capping (Gemma 2) is a score
    modification; grouped-query heads are expanded by the kernel itself.
    """
    if dropout:
        raise TrainerError("attention dropout is not supported with flex attention; set attention_dropout to 0 "
                           f"or {ATTENTION_ENV}=dense")
    score_mod = None
    if softcap is not None:
        cap = float(softcap)

        def capped(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor,
                   kv: torch.Tensor) -> torch.Tensor:
            return cap * torch.tanh(score / cap)

        score_mod = capped
    kernel = _flex_kernel(query.device)
    out = kernel(query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling,
                 enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register_flex() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX_IMPLEMENTATION, _flex_attention_forward)
