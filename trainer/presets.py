"""Model shapes `init-model` writes: tiny (tests), small (~100M, CPU benchmarks), 7b (GPU benchmarks).

Every preset uses the real Mistral vocabulary (32000) so token ids from dataprep fit any of them;
each family keeps what makes it that family (Llama 3's rope scaling, Qwen's q/k/v biases, Qwen 3's
q/k norms and wider heads, Gemma's scaled embedding, soft-capping and alternating sliding-window
layers), so the tiny presets exercise every path of the pipeline's layers.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Family = Literal["mistral", "llama", "llama3", "qwen2", "qwen3", "gemma2", "gemma3"]
Preset = Literal["tiny", "small", "7b"]

FAMILIES: tuple[str, ...] = get_args(Family)
PRESETS: tuple[str, ...] = get_args(Preset)
VOCAB = 32000
# The tiny Gemma presets slide their local layers over 16 tokens, so rows of tens of tokens
# (what the tests run) already have keys outside the window.
TINY_WINDOW = 16

_SHAPES: dict[str, dict[str, Any]] = {
    # initializer_range 1/sqrt(hidden): a frozen random LM head row then reaches logits of about
    # sqrt(hidden) = 11 against a normalised hidden state, so LoRA alone can fit the demo data
    # (at transformers' default 0.02 the head caps every logit near 0.02 x hidden, about 2.6, and
    # the loss cannot fall far below ln(32000) = 10.4).
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, initializer_range=128**-0.5),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=4, max_position_embeddings=4096),
}
# The published shapes (from each model's config.json) behind the 7b preset, vocabulary aside.
_SEVEN_B: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.1 and Llama-2-7B
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096),
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096),
    # Llama-3.1-8B
    "llama3": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, max_position_embeddings=131072),
    # Qwen2.5-7B
    "qwen2": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, max_position_embeddings=32768),
    # Qwen3-8B
    "qwen3": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=40960),
    # gemma-2-9b
    "gemma2": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                   max_position_embeddings=8192),
    # the text model of gemma-3-12b
    "gemma3": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                   max_position_embeddings=131072),
}
# Llama 3.1/3.2's rope scaling, as in their config.json files.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def _head_dim(shape: dict[str, Any]) -> int:
    return int(shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"])


def preset_config(family: Family, preset: Preset) -> Any:
    """A transformers config for `family`/`preset` (random-weight models are built from it).

    Tied heads follow the real models of each size: the tiny Llama, Llama 3, Qwen and Gemma presets
    tie their LM head to the embedding (as Llama 3.2 1B, Qwen2.5 0.5B, Qwen3 0.6B and every Gemma
    do), the Mistral presets and the 7b Llama, Qwen presets do not.
    """
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    shape = dict(_SEVEN_B[family]) if preset == "7b" else dict(_SHAPES[preset])
    tiny = preset == "tiny"
    small = preset != "7b"
    common: dict[str, Any] = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    if family == "mistral":
        shape.setdefault("sliding_window", None)
        return MistralConfig(**common, **shape, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "llama":
        return LlamaConfig(**common, **shape, rms_norm_eps=1e-5, tie_word_embeddings=tiny)
    if family == "llama3":
        shape["max_position_embeddings"] = 131072  # above the rope scaling's original 8192, as in Llama 3.1
        return LlamaConfig(**common, **shape, rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE),
                           tie_word_embeddings=small)
    if family == "qwen2":
        return Qwen2Config(**common, **shape, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                           "rope_theta": 1000000.0}, tie_word_embeddings=small)
    if family == "qwen3":
        if small:  # Qwen 3's heads are wider than hidden_size / heads (128 in every size)
            shape["head_dim"] = 2 * _head_dim(shape)
        return Qwen3Config(**common, **shape, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                           "rope_theta": 1000000.0}, tie_word_embeddings=small)
    gemma: dict[str, Any] = dict(rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                 pad_token_id=0)
    if small:
        shape.update(head_dim=_head_dim(shape), sliding_window=TINY_WINDOW if tiny else 512)
        shape["query_pre_attn_scalar"] = shape["head_dim"]
    layers = shape["num_hidden_layers"]
    if family == "gemma2":  # local and global layers alternate, soft-capped attention and logits
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return Gemma2Config(**common, **shape, **gemma, layer_types=types, attn_logit_softcapping=50.0,
                            final_logit_softcapping=30.0)
    # Gemma 3: five local layers per global one (one in two at the small sizes, so each kind is
    # present), a local RoPE base for sliding layers and a scaled global one for full layers
    period = 6 if preset == "7b" else 2
    types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)]
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    return Gemma3TextConfig(**common, **shape, **gemma, layer_types=types, rope_parameters=rope)
