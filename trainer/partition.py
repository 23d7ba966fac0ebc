"""Cut the pipeline items (embedding, decoder layers, norm + LM head) into balanced stages.

Balanced by estimated compute per token, not by parameter count: a 32000-word LM head costs as
much as several small decoder layers, while the embedding costs almost nothing. Every stage gets
at least one decoder layer (so every stage trains LoRA weights), which is why a pipeline cannot
have more stages than the model has decoder layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelora.trainer.errors import TrainerError


@dataclass(frozen=True)
class Partition:
    bounds: tuple[int, ...]  # stage s owns items [bounds[s], bounds[s+1])
    costs: tuple[float, ...]  # per item
    num_layers: int

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    def items(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stage_cost(self, stage: int) -> float:
        return sum(self.costs[i] for i in self.items(stage))

    def item_name(self, item: int) -> str:
        if item == 0:
            return "embed"
        if item == self.num_layers + 1:
            return "norm+head"
        return f"layer {item - 1}"

    def describe(self, stage: int) -> str:
        items = list(self.items(stage))
        layers = [i - 1 for i in items if 0 < i <= self.num_layers]
        parts = ["embed"] if 0 in items else []
        if layers:
            parts.append(f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}")
        if self.num_layers + 1 in items:
            parts.append("norm+head")
        return ", ".join(parts)

    def table(self) -> str:
        total = sum(self.costs)
        lines = ["stage  items                              est. GFLOP/token  share"]
        for s in range(self.stages):
            cost = self.stage_cost(s)
            lines.append(f"{s + 1:>5}  {self.describe(s):<34} {cost / 1e9:>16.4f}  {cost / total:>5.1%}")
        return "\n".join(lines)


def item_costs(config: Any, *, seq_len: int) -> list[float]:
    """Forward FLOPs per token of each item (backward scales every item alike)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = config.num_key_value_heads * head_dim
    attn_proj = 2 * (h * heads * head_dim * 2 + 2 * h * kv)
    window = getattr(config, "sliding_window", None) or seq_len
    attn_scores = 2 * 2 * heads * head_dim * min(seq_len, window) / 2  # causal: half the keys on average
    mlp = 2 * 3 * h * config.intermediate_size
    layer = attn_proj + attn_scores + mlp
    head = 2 * h * config.vocab_size + 5 * config.vocab_size  # matmul, then softmax/cross-entropy
    embed = h  # a lookup
    return [embed, *([layer] * config.num_hidden_layers), head]


def balanced_partition(config: Any, *, stages: int, seq_len: int) -> Partition:
    """Contiguous split minimising the most expensive stage, one decoder layer per stage at least."""
    n = config.num_hidden_layers
    if stages > n:
        raise TrainerError(
            f"parallel.stages is {stages} but the model has {n} decoder layer{'s' if n != 1 else ''}; "
            f"use at most {n} stages"
        )
    costs = item_costs(config, seq_len=seq_len)
    count = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def has_layer(a: int, b: int) -> bool:  # items [a, b) include a decoder layer
        return max(a, 1) < min(b, n + 1)

    inf = float("inf")
    # best[k][j]: minimal max-stage cost splitting items [0, j) into k stages
    best = [[inf] * (count + 1) for _ in range(stages + 1)]
    cut = [[0] * (count + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(1, count + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf or not has_layer(i, j):
                    continue
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j] - 1e-9:
                    best[k][j], cut[k][j] = value, i
    bounds = [count]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return Partition(tuple(reversed(bounds)), tuple(costs), n)
