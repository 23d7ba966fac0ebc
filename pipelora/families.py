"""The model families the trainer supports: one table from a config's `model_type` to how each
pipeline item (embedding, decoder layer, final norm, head) is built and what it needs.

One table serves the spec and the trainer. The spec refuses a `model_type` that is not here
(naming the ones that are) and a `lora.target_modules` name that no family has (and, once the
model's `config.json` is read, one its own family lacks). The trainer builds each item from the
entry's transformers classes (reached through `pipelora.trainer.compat`) and reads each item's
weights under the entry's names, so a model the spec accepts is one the trainer can build.

This module is plain data and small pure functions over a config (a `config.json` dict or a
transformers config object): the spec imports it without torch or transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FAMILIES",
    "LINEAR_NAMES",
    "Family",
    "family_of",
    "known_linear_names",
    "layer_type",
    "layer_window",
    "model_problems",
    "supported_model_types",
    "unknown_targets",
]

_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SLIDING = "sliding_attention"  # transformers' name for a layer type with a local attention window


@dataclass(frozen=True)
class Family:
    """How the trainer builds one family's pipeline items, and under which names it reads them.

    The decoder layer, its norm and its rotary embedding are transformers' own classes, found
    in `transformers.models.<modeling>.modeling_<modeling>`; everything a layer does inside
    (biases, q/k norms, pre/post feed-forward norms, attention scaling) comes with the class.
    What lives outside the layer in transformers' model classes is listed here, so the pipeline
    items do it too.
    """

    title: str  # the models it covers, for messages and docs
    modeling: str  # transformers.models.<modeling>.modeling_<modeling>
    decoder_layer: str  # class of one decoder layer: (config, layer_idx)
    norm: str  # class of the final norm: (hidden_size, eps=rms_norm_eps)
    rotary: str  # class of the rotary embedding: (config=config)
    linears: tuple[str, ...]  # nn.Linear attribute names in one decoder layer, in layer order
    # embedding: weight under `embedding`; scaled by sqrt(hidden_size), cast to the weight's dtype
    embedding: str = "model.embed_tokens"
    embedding_scaled: bool = False
    # decoder layers: weights under `layers`.<index>
    layers: str = "model.layers"
    # one RoPE table per layer type (Gemma 3: a local base for sliding layers, a global one for full)
    rope_per_layer_type: bool = False
    # the config may cap attention logits (`attn_logit_softcapping`): sdpa cannot, so such models
    # run transformers' eager attention, which takes an additive mask
    attention_softcap: bool = False
    # final norm and head: the head reads the embedding's weight when `tie_word_embeddings`
    norm_weights: str = "model.norm"
    head: str = "lm_head"
    # logits = cap * tanh(logits / cap) with cap = config.final_logit_softcapping, when set
    logit_softcap: bool = False
    # config switches (attribute → what it means) whose true value the trainer cannot train
    refused: tuple[tuple[str, str], ...] = ()


_BIDIRECTIONAL = (("use_bidirectional_attention", "bidirectional attention (an embedding model, not a causal LM)"),)

# config.json's `model_type` → its family. Llama 2 and Llama 3.x share `llama` (3.x adds
# `rope_scaling` of type llama3, read by transformers' own rotary class); Qwen2 and Qwen2.5 share
# `qwen2`; Gemma 3 text models (1B, 270M) are `gemma3_text`.
FAMILIES: dict[str, Family] = {
    "mistral": Family("Mistral", "mistral", "MistralDecoderLayer", "MistralRMSNorm", "MistralRotaryEmbedding",
                      _LLAMA_LINEARS),
    "llama": Family("Llama 2, Llama 3.x", "llama", "LlamaDecoderLayer", "LlamaRMSNorm", "LlamaRotaryEmbedding",
                    _LLAMA_LINEARS),
    "qwen2": Family("Qwen2, Qwen2.5", "qwen2", "Qwen2DecoderLayer", "Qwen2RMSNorm", "Qwen2RotaryEmbedding",
                    _LLAMA_LINEARS),
    "qwen3": Family("Qwen3", "qwen3", "Qwen3DecoderLayer", "Qwen3RMSNorm", "Qwen3RotaryEmbedding", _LLAMA_LINEARS),
    "gemma2": Family("Gemma 2", "gemma2", "Gemma2DecoderLayer", "Gemma2RMSNorm", "Gemma2RotaryEmbedding",
                     _LLAMA_LINEARS, embedding_scaled=True, attention_softcap=True, logit_softcap=True,
                     refused=_BIDIRECTIONAL),
    "gemma3_text": Family("Gemma 3 (text)", "gemma3", "Gemma3DecoderLayer", "Gemma3RMSNorm", "Gemma3RotaryEmbedding",
                          _LLAMA_LINEARS, embedding_scaled=True, rope_per_layer_type=True, attention_softcap=True,
                          logit_softcap=True, refused=_BIDIRECTIONAL),
}

# Model types that are close to a supported one but are not it: the sentence says which to use.
_NEAR_MISSES = {
    "gemma3": "a Gemma 3 model with a vision tower; its text-only form (model_type gemma3_text, e.g. Gemma 3 1B) "
              "is supported",
}

# config.json's `model_type` → the `nn.Linear` attribute names of one decoder layer, in layer order.
# PEFT's `all-linear` means all of them (it leaves out only the output layer, lm_head).
LINEAR_NAMES: dict[str, tuple[str, ...]] = {model_type: f.linears for model_type, f in FAMILIES.items()}


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def known_linear_names() -> tuple[str, ...]:
    """Every family's linear names, each once, in table order: what a spec may name before the
    model is known."""
    return tuple(dict.fromkeys(name for names in LINEAR_NAMES.values() for name in names))


def _get(config: Mapping[str, Any] | Any, key: str) -> Any:
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def family_of(config: Mapping[str, Any] | Any) -> Family:
    """The family of a config (dict or transformers config); KeyError for an unsupported one
    (`model_problems` says why in a sentence)."""
    return FAMILIES[_get(config, "model_type")]


def layer_type(config: Mapping[str, Any] | Any, index: int) -> str | None:
    """The attention type of decoder layer `index` (`sliding_attention`, `full_attention`) where the
    config lists them per layer (Gemma, Qwen), else None."""
    types = _get(config, "layer_types")
    return str(types[index]) if types else None


def layer_window(config: Mapping[str, Any] | Any, index: int) -> int | None:
    """How many keys back (the query's own included) decoder layer `index` may attend; None: all.

    Where a config lists layer types, only sliding layers have a window (Gemma alternates, Qwen
    slides only from `max_window_layers` on, and only with `use_sliding_window`); otherwise
    `sliding_window` applies to every layer (Mistral), and a config without one has none (Llama).
    """
    window = _get(config, "sliding_window")
    kind = layer_type(config, index)
    if kind is not None:
        return int(window) if kind == SLIDING and window else None
    return int(window) if window else None


def unknown_targets(target_modules: str | Sequence[str], names: Sequence[str]) -> list[str]:
    """The names in a list-valued `lora.target_modules` that are not in `names` (none for all-linear)."""
    if isinstance(target_modules, str):
        return []
    return [t for t in dict.fromkeys(target_modules) if t not in names]


def _supported_list() -> str:
    types = supported_model_types()
    return f"{', '.join(types[:-1])} or {types[-1]}" if len(types) > 1 else types[0]


def model_problems(config: Mapping[str, Any], target_modules: str | Sequence[str], *, where: str) -> list[str]:
    """One sentence per way the spec's LoRA targets do not fit the model whose `config.json`
    (found at `where`) is `config`."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        why = f" ({_NEAR_MISSES[model_type]})" if isinstance(model_type, str) and model_type in _NEAR_MISSES else ""
        return [
            f"model.uri: {where} has model_type '{model_type}'{why}, which the trainer does not support; "
            f"point model.uri at a {_supported_list()} model"
        ]
    problems = [
        f"model.uri: {where} sets {key}: {meaning}, which the trainer cannot train; point model.uri at a causal LM"
        for key, meaning in FAMILIES[model_type].refused if config.get(key)
    ]
    names = LINEAR_NAMES.get(model_type, FAMILIES[model_type].linears)
    missing = unknown_targets(target_modules, names)
    if missing:
        problems.append(
            f"lora.target_modules names {', '.join(missing)}, which a {model_type} decoder layer does not have "
            f"(model {where}); use all-linear or some of {', '.join(names)}"
        )
    return problems
