"""Model shapes `init-model` writes: tiny (tests), small (~100M, CPU benchmarks), 7b (GPU benchmarks).

Every preset uses the real Mistral vocabulary (32000) so token ids from dataprep fit any of them.
"""

from __future__ import annotations

from typing import Any, Literal

Family = Literal["mistral", "llama"]
Preset = Literal["tiny", "small", "7b"]

VOCAB = 32000

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
_SEVEN_B: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.1 and Llama-2-7B, as in their published config.json files.
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096),
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096),
}


def preset_config(family: Family, preset: Preset) -> Any:
    """A transformers config for `family`/`preset` (random-weight models are built from it).

    The tiny Llama ties its LM head to the embedding (as small Llama 3 models do), so the tied
    path is exercised by the tests; the Mistral presets do not tie, as Mistral 7B does not.
    """
    from transformers import LlamaConfig, MistralConfig

    shape = dict(_SEVEN_B[family]) if preset == "7b" else dict(_SHAPES[preset])
    common: dict[str, Any] = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                                  rms_norm_eps=1e-5 if family == "llama" else 1e-6)
    if family == "mistral":
        shape.setdefault("sliding_window", None)
        return MistralConfig(**common, **shape, tie_word_embeddings=False)
    return LlamaConfig(**common, **shape, tie_word_embeddings=preset == "tiny")
