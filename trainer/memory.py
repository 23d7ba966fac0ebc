"""Predicted memory, time and traffic of each pipeline stage, from the model's `config.json` alone.

A user learns whether a job fits before any pod is scheduled or any weight is read, and the trainer
cuts the model so that every stage fits (`partition`). Nothing here imports torch or transformers:
`plan`, `validate` and `submit` run on a laptop against a config dict.

Memory of stage s of p (0-based), per rank:

    peak = weights + LoRA (params + grads, fp32) + AdamW state (2 x fp32)
           + k_s x (saved activations of one micro-batch + the stage's output kept for backward)
           + max(2, k_s) x received stage input (DeepSpeed keeps one per pipe buffer)
           + receive buffers + the working memory of the largest item's backward + runtime reserve

with k_s = min(p - s, micro_batches): under 1F1B stage s holds p - s micro-batches in flight (the
first stage p, the last one). The first stage's activation memory does not shrink as stages are
added (p in flight x n/p layers), only its weights do.

Saved activations of one decoder layer, per token, in bytes (w: run dtype bytes; h hidden; H, d
heads and head size; I intermediate; S seq_len; r LoRA rank), as autograd keeps them with frozen
base weights, fp32 LoRA and SDPA over the dense block-diagonal mask (counted tensor by tensor
with `saved_tensors_hooks`; exact for every supported family, fp32 and bf16, with and without
dropout, all-linear or some targets):

    2 x (4h + 4)              two RMSNorms: the fp32 input and its rsqrt (Gemma: four norms; Qwen3 and
                              Gemma 3 add q/k norms, 4(H + KV)(d + 1))
    2d w                      RoPE cos and sin (recomputed per layer from position_ids)
    S w                       the dense mask, as SDPA's float bias (b S^2 w per micro-batch); none
                              with flex attention on CUDA (`pipelora.trainer.attention`)
    4 H d w + 4H              q, k and v (GQA heads repeated), attention output, log-sum-exp
                              (k and v at their own KV heads when they are 1 or H, or under flex:
                              no copy); eager attention (Gemma 2's capped logits on CPU) keeps q, k,
                              v and the scores, H S (w + 4), and H S w more for their cast back
                              when w is not 4; flex applies the cap as a score modification
    3 I w                     gate, activation(gate), up
    LoRA inputs               without dropout in fp32: one shared input per group a target reads
                              (q/k/v 4h, gate/up 4h, down 4I; o reads SDPA's own output); in bf16
                              each target keeps its own fp32 copy (4 x in); with dropout each target
                              keeps the dropped input (4 x in) and its mask (4 bytes on CPU, 1 on
                              CUDA per element)
    4 r per target            the low-rank middle

With activation checkpointing a layer keeps only its input (h w per token) and recomputes the rest
during backward, so its working memory is twice the full set (recomputed activations and their
gradients). The LM head keeps the logits (V w), the fp32 log-softmax (4V) and its norm's input.

FLOPs per token (the standard dense-matmul count):

    frozen linear weights N_f   forward 2 N_f, input gradients 2 N_f (no weight gradients)  = 4 N_f
    LoRA weights N_l            forward 2 N_l, input and weight gradients 4 N_l              = 6 N_l
    attention                   12 L H d S (QK^T and PV, forward 4, backward 8, per layer)
    embedding                   0 (a lookup)

`model_flops` (what MFU counts, as torchtitan does: recomputation excluded; a full fine-tune would
be 6 N) uses each layer's min(S, window); `flops` (what the stage executes, for its predicted time) adds
the recomputed forward under activation checkpointing and the full S a dense mask computes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pipelora.families import FAMILIES, LINEAR_NAMES, layer_window
from pipelora.trainer.errors import TrainerError

GIB = 1024**3
Device = Literal["cuda", "cpu"]
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Memory a rank uses outside the model's tensors: CUDA context, NCCL buffers, allocator slack.
RESERVE_BYTES: dict[str, int] = {"cuda": 2 * GIB, "cpu": 0}
GPU_MEMORY_ENV = "PIPELORA_GPU_MEMORY_GIB"
GPU_TFLOPS_ENV = "PIPELORA_GPU_TFLOPS"
# Which linear layers read which activation (the LoRA input groups of one decoder layer).
_GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("mlp_in", ("gate_proj", "up_proj")),
           ("mlp_out", ("down_proj",)))


# What a family's decoder layer has beyond the Llama layout (biases, q/k norms, the four norms of
# Gemma with their (1 + weight) scale), and transformers' default for tied embeddings.
_TRAITS: dict[str, dict[str, Any]] = {
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma2": {"norms": 4, "unit_offset_norms": True, "tied": True},
    "gemma3_text": {"norms": 4, "qk_norm": True, "unit_offset_norms": True, "tied": True},
}


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder model that decide its memory and FLOPs."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    windows: tuple[int | None, ...] = ()  # each layer's attention window (None: the whole row)
    attention_bias: bool = False  # q, k, v and o biases
    qkv_bias: bool = False  # q, k and v biases only (Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k (Qwen3, Gemma 3)
    norms: int = 2  # RMSNorms per decoder layer (Gemma: four)
    unit_offset_norms: bool = False  # norms scale by (1 + weight), a small saved tensor per call (Gemma)
    eager_attention: bool = False  # attention logits are capped: transformers' eager attention (Gemma 2)
    logit_softcap: bool = False  # the head caps its logits with tanh (Gemma)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> ModelShape:
        """From a `config.json` dict or a transformers config, with transformers' defaults."""
        def get(key: str, default: Any = None) -> Any:
            value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
            return default if value is None else value

        model_type = str(get("model_type", "mistral"))
        traits = _TRAITS.get(model_type, {})
        family = FAMILIES.get(model_type)
        hidden, heads, layers = int(get("hidden_size")), int(get("num_attention_heads")), int(get("num_hidden_layers"))
        try:
            windows = tuple(layer_window(config, i) for i in range(layers))
        except (KeyError, IndexError, TypeError):
            windows = (int(get("sliding_window")) if get("sliding_window") else None,) * layers
        return cls(model_type=model_type, hidden=hidden, intermediate=int(get("intermediate_size")), layers=layers,
                   heads=heads, kv_heads=int(get("num_key_value_heads", heads)),
                   head_dim=int(get("head_dim", hidden // heads)), vocab=int(get("vocab_size")),
                   tied=bool(get("tie_word_embeddings", traits.get("tied", False))), windows=windows,
                   attention_bias=bool(get("attention_bias", False)), qkv_bias=traits.get("qkv_bias", False),
                   mlp_bias=bool(get("mlp_bias", False)), qk_norm=traits.get("qk_norm", False),
                   norms=traits.get("norms", 2), unit_offset_norms=traits.get("unit_offset_norms", False),
                   eager_attention=bool(family and family.attention_softcap and get("attn_logit_softcapping")),
                   logit_softcap=bool(family and family.logit_softcap and get("final_logit_softcapping")))

    @property
    def parameters(self) -> int:
        """The model's parameters (a tied head counted once)."""
        return self.layers * self.layer_params() + (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        lin = self.linears()
        weights = sum(a * b for a, b in lin.values())
        bias = 0
        if self.attention_bias or self.qkv_bias:
            bias += sum(lin[n][1] for n in ("q_proj", "k_proj", "v_proj"))
        if self.attention_bias:
            bias += lin["o_proj"][1]
        if self.mlp_bias:
            bias += sum(lin[n][1] for n in ("gate_proj", "up_proj", "down_proj"))
        norms = self.norms * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return weights + bias + norms

    def targets(self, target_modules: str | Sequence[str]) -> tuple[str, ...]:
        """The linear layers LoRA adapts in this family (`all-linear`: every one)."""
        names = LINEAR_NAMES.get(self.model_type, tuple(self.linears()))
        if isinstance(target_modules, str):
            return tuple(names) if target_modules == "all-linear" else (target_modules,)
        return tuple(n for n in names if n in set(target_modules))


@dataclass(frozen=True)
class RunShape:
    """What the job spec (and the device) decide about memory and time."""

    seq_len: int
    micro_batch_size: int = 1
    micro_batches: int = 8
    stages: int = 1
    nodes: int = 1
    gpus_per_node: int = 1
    dtype_bytes: int = 2
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: bool = False
    activation_checkpointing: bool = False
    device: Device = "cuda"
    dense_mask: bool = True  # dense block-diagonal masks (CPU); False: flex attention's block mask (CUDA)

    @classmethod
    def from_spec(cls, spec: Any, *, device: Device = "cuda") -> RunShape:
        p, t = spec.parallel, spec.training
        dtype = t.dtype if t.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
        targets = spec.lora.target_modules
        return cls(seq_len=spec.dataset.seq_len, micro_batch_size=p.micro_batch_size, micro_batches=p.micro_batches,
                   stages=p.stages, nodes=p.nodes, gpus_per_node=p.gpus_per_node, dtype_bytes=DTYPE_BYTES[dtype],
                   lora_r=spec.lora.r, lora_targets=targets if isinstance(targets, str) else tuple(targets),
                   lora_dropout=spec.lora.dropout > 0, activation_checkpointing=t.activation_checkpointing,
                   device=device, dense_mask=device != "cuda")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return max(1, self.world_size // self.stages)

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch."""
        return self.micro_batch_size * self.seq_len

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose activations stage `stage` (0-based) holds under 1F1B."""
        return min(self.stages - stage, self.micro_batches)


@dataclass(frozen=True)
class ItemCost:
    """One pipeline item (embedding, decoder layer, norm + head) and what it costs."""

    name: str
    params: int  # frozen base parameters
    lora_params: int
    weight_bytes: int  # the frozen parameters in the run dtype
    flops: float  # executed per token per training step (forward + backward + recompute)
    model_flops: float  # per token, as MFU counts them (no recompute)
    act_bytes: int  # saved for backward, one micro-batch, without activation checkpointing
    act_ckpt_bytes: int  # the same with activation checkpointing
    work_bytes: int  # transient while its backward runs, without checkpointing
    work_ckpt_bytes: int


def _layer_act_per_token(model: ModelShape, run: RunShape) -> float:
    """Bytes per token a decoder layer keeps for backward (see the module docstring)."""
    h, d, heads, inter = model.hidden, model.head_dim, model.heads, model.intermediate
    w, seq = run.dtype_bytes, run.seq_len
    lin = model.linears()
    targets = set(model.targets(run.lora_targets))
    eager = model.eager_attention and run.dense_mask  # flex caps the logits itself (a score modification)
    # k and v reach SDPA repeated to every query head (a copy), except where no copy is needed: as many
    # KV heads as query heads, or a single KV head (the repeat is then a view); flex takes them as they are.
    kv = model.kv_heads if model.kv_heads in (1, heads) or not run.dense_mask else heads
    # q, k, v, and (SDPA and flex keep it) the attention output
    attention = (heads + 2 * kv + (0 if eager else heads)) * d * w
    total = model.norms * (4 * h + 4) + 2 * d * w + attention + 3 * inter * w
    if model.qk_norm:  # fp32 copies of q and k, and their rsqrt, per head
        total += 4 * (heads + model.kv_heads) * d + 4 * (heads + model.kv_heads)
    if eager:  # the scores: capped (tanh), fp32 softmax, cast back to the run dtype
        total += heads * seq * (w + 4 + (w if w != 4 else 0))
    else:  # SDPA or flex: log-sum-exp, and (SDPA) the dense mask as its float bias
        total += 4 * heads + (seq * w if run.dense_mask else 0)
    drop_mask = 4 if run.device == "cpu" else 1
    for group, names in _GROUPS:
        hit = [n for n in names if n in targets]
        if not hit:
            continue
        width = lin[hit[0]][0]
        if run.lora_dropout:
            total += len(hit) * width * (4 + drop_mask)
        elif w != 4:
            total += len(hit) * width * 4
        elif group != "o" or eager:  # fp32: one shared input (SDPA keeps its output anyway)
            total += width * 4
    total += len(targets) * run.lora_r * 4
    return total


def _layer_act_per_call(model: ModelShape) -> int:
    """Bytes a layer keeps per micro-batch whatever its size: Gemma's (1 + weight) norm scales."""
    if not model.unit_offset_norms:
        return 0
    return 4 * (model.norms * model.hidden + (2 * model.head_dim if model.qk_norm else 0))


def item_costs(model: ModelShape, run: RunShape) -> list[ItemCost]:
    """The embedding, each decoder layer, then the final norm + LM head."""
    h, v, w, t = model.hidden, model.vocab, run.dtype_bytes, run.tokens
    lin = model.linears()
    targets = model.targets(run.lora_targets)
    frozen = sum(a * b for a, b in lin.values())
    lora = sum(run.lora_r * (lin[n][0] + lin[n][1]) for n in targets)
    attn_fwd = 4 * model.heads * model.head_dim
    act = math.ceil(_layer_act_per_token(model, run) * t) + _layer_act_per_call(model)
    act_ckpt = h * w * t  # the layer's input; position_ids are shared by all layers
    layers = []
    for i in range(model.layers):
        own = model.windows[i] if i < len(model.windows) else None
        window = min(run.seq_len, own or run.seq_len)
        executed_span = run.seq_len if run.dense_mask else window / 2  # a dense mask computes every score
        fwd = 2 * frozen + 2 * lora + attn_fwd * executed_span
        bwd = 2 * frozen + 4 * lora + 2 * attn_fwd * executed_span
        layers.append(ItemCost(name=f"layer {i}", params=model.layer_params(), lora_params=lora,
                               weight_bytes=model.layer_params() * w,
                               flops=fwd + bwd + (fwd if run.activation_checkpointing else 0),
                               model_flops=4 * frozen + 6 * lora + 3 * attn_fwd * window, act_bytes=act,
                               act_ckpt_bytes=act_ckpt, work_bytes=act, work_ckpt_bytes=2 * act))
    embed = ItemCost(name="embed", params=v * h, lora_params=0, weight_bytes=v * h * w, flops=float(h),
                     model_flops=0.0, act_bytes=0, act_ckpt_bytes=0, work_bytes=0, work_ckpt_bytes=0)
    # The head keeps the logits (DeepSpeed holds the last stage's output until its backward), the fp32
    # log-softmax and its norm's fp32 input (and, capped, the tanh); the loss's backward has two fp32
    # logit-sized gradients alive at once (the forward's fp32 copy of bf16 logits is smaller).
    head_act = t * (v * w + 4 * v + 4 * h + 4 + 8 + (v * w if model.logit_softcap else 0))
    head_act += 4 * h if model.unit_offset_norms else 0
    head_work = t * 8 * v
    head = ItemCost(name="norm+head", params=v * h + h, lora_params=0, weight_bytes=(v * h + h) * w,
                    flops=4.0 * h * v + 10.0 * v, model_flops=4.0 * h * v, act_bytes=head_act, act_ckpt_bytes=head_act,
                    work_bytes=head_work, work_ckpt_bytes=head_work)
    return [embed, *layers, head]


def model_flops_per_token(model: ModelShape, run: RunShape) -> float:
    """Training FLOPs per token of the whole model, as MFU counts them (see the module docstring)."""
    return sum(item.model_flops for item in item_costs(model, run))


@dataclass(frozen=True)
class StageEstimate:
    """Predicted memory and time of one stage (items [first, stop))."""

    stage: int  # 0-based
    first: int
    stop: int
    params: int
    lora_params: int
    weight_bytes: int
    lora_bytes: int  # LoRA parameters and their gradients, fp32
    optimizer_bytes: int  # AdamW's two fp32 moments
    act_bytes: int  # per micro-batch, without activation checkpointing
    act_ckpt_bytes: int  # per micro-batch, with it
    in_flight: int
    buffer_bytes: int  # stage inputs and outputs DeepSpeed keeps, and its receive buffers
    work_bytes: int
    reserve_bytes: int
    peak_bytes: int
    flops_per_token: float
    seconds_per_micro_batch: float | None = None

    @property
    def activation_bytes(self) -> int:
        """Activations held at the peak: in-flight micro-batches times what each keeps."""
        return self.peak_bytes - self.weight_bytes - self.lora_bytes - self.optimizer_bytes - self.reserve_bytes


class _Prefix:
    """Prefix sums and range maxima over the items, so any stage's estimate is O(1)."""

    def __init__(self, items: Sequence[ItemCost], run: RunShape) -> None:
        self.items, self.run = list(items), run
        ckpt = run.activation_checkpointing

        def prefix(values: list[float]) -> list[float]:
            out = [0.0]
            for x in values:
                out.append(out[-1] + x)
            return out

        self.params = prefix([i.params for i in items])
        self.lora = prefix([i.lora_params for i in items])
        self.weights = prefix([i.weight_bytes for i in items])
        self.flops = prefix([i.flops for i in items])
        self.act = prefix([i.act_bytes for i in items])
        self.act_ckpt = prefix([i.act_ckpt_bytes for i in items])
        self.used_act = self.act_ckpt if ckpt else self.act
        work = [i.work_ckpt_bytes if ckpt else i.work_bytes for i in items]
        n = len(items)
        self.work_max = [[0] * (n + 1) for _ in range(n + 1)]
        for a in range(n):
            best = 0
            for b in range(a + 1, n + 1):
                best = max(best, work[b - 1])
                self.work_max[a][b] = best

    def buffers(self, stage: int, hidden: int) -> int:
        """Stage inputs and outputs DeepSpeed keeps, and its receive buffers."""
        run = self.run
        t, k = run.tokens, run.in_flight(stage)
        boundary = t * (hidden * run.dtype_bytes + 8)  # hidden state and int64 position_ids
        last = stage == run.stages - 1
        inputs = max(2, k) * (boundary if stage > 0 else 16 * t)
        outputs = 0 if last else k * boundary
        receive = (boundary if stage > 0 else 0) + (0 if last else t * hidden * run.dtype_bytes)
        return inputs + outputs + receive

    def peak(self, stage: int, first: int, stop: int, *, reserve: int, hidden: int) -> int:
        k = self.run.in_flight(stage)
        return int(self.weights[stop] - self.weights[first] + 16 * (self.lora[stop] - self.lora[first])
                   + k * (self.used_act[stop] - self.used_act[first]) + self.buffers(stage, hidden)
                   + self.work_max[first][stop] + reserve)

    def estimate(self, stage: int, first: int, stop: int, *, reserve: int, hidden: int,
                 flop_rate: float | None = None) -> StageEstimate:
        lora = int(self.lora[stop] - self.lora[first])
        flops = self.flops[stop] - self.flops[first]
        seconds = flops * self.run.tokens / flop_rate if flop_rate else None
        return StageEstimate(stage=stage, first=first, stop=stop, params=int(self.params[stop] - self.params[first]),
                             lora_params=lora, weight_bytes=int(self.weights[stop] - self.weights[first]),
                             lora_bytes=8 * lora, optimizer_bytes=8 * lora,
                             act_bytes=int(self.act[stop] - self.act[first]),
                             act_ckpt_bytes=int(self.act_ckpt[stop] - self.act_ckpt[first]),
                             in_flight=self.run.in_flight(stage), buffer_bytes=self.buffers(stage, hidden),
                             work_bytes=self.work_max[first][stop], reserve_bytes=reserve,
                             peak_bytes=self.peak(stage, first, stop, reserve=reserve, hidden=hidden),
                             flops_per_token=flops, seconds_per_micro_batch=seconds)


def estimate_stages(model: ModelShape, run: RunShape, bounds: Sequence[int], *, reserve_bytes: int = 0,
                    flop_rate: float | None = None) -> list[StageEstimate]:
    """Estimates of every stage of the cut `bounds` (stage s owns items [bounds[s], bounds[s+1]))."""
    prefix = _Prefix(item_costs(model, run), run)
    return [prefix.estimate(s, bounds[s], bounds[s + 1], reserve=reserve_bytes, hidden=model.hidden,
                            flop_rate=flop_rate) for s in range(len(bounds) - 1)]


def cut(items: Sequence[ItemCost], run: RunShape, *, hidden: int, budget_bytes: int | None,
        reserve_bytes: int = 0) -> tuple[tuple[int, ...], bool]:
    """The contiguous cut into `run.stages` stages (each with a decoder layer) that minimises the
    slowest stage's time among those whose every stage's predicted peak fits `budget_bytes`; among
    equally fast cuts, the one with the smallest largest peak.

    Returns (bounds, fits). When no cut fits, the cut with the smallest largest peak, and False.
    """
    stages, count = run.stages, len(items)
    layers = count - 2
    prefix = _Prefix(items, run)
    inf = float("inf")

    def has_layer(a: int, b: int) -> bool:  # items [a, b) include a decoder layer
        return max(a, 1) < min(b, layers + 1)

    def peak(s: int, a: int, b: int) -> int:
        return prefix.peak(s, a, b, reserve=reserve_bytes, hidden=hidden)

    def solve(value: Any, limit: Any) -> tuple[float, tuple[int, ...]] | None:
        # best[k][j]: the smallest largest value splitting items [0, j) into k stages within `limit`
        best = [[inf] * (count + 1) for _ in range(stages + 1)]
        back = [[0] * (count + 1) for _ in range(stages + 1)]
        best[0][0] = 0.0
        for k in range(1, stages + 1):
            last = k == stages
            for j in ([count] if last else range(k, count)):
                for i in range(k - 1, j):
                    if best[k - 1][i] == inf or not has_layer(i, j) or not limit(k - 1, i, j):
                        continue
                    v = max(best[k - 1][i], value(k - 1, i, j))
                    if v < best[k][j] * (1 - 1e-12) - 1e-9:
                        best[k][j], back[k][j] = v, i
        if best[stages][count] == inf:
            return None
        bounds = [count]
        for k in range(stages, 0, -1):
            bounds.append(back[k][bounds[-1]])
        return best[stages][count], tuple(reversed(bounds))

    def time(s: int, a: int, b: int) -> float:
        return prefix.flops[b] - prefix.flops[a]

    def fits(s: int, a: int, b: int) -> bool:
        return budget_bytes is None or peak(s, a, b) <= budget_bytes

    fastest = solve(time, fits)
    if fastest is None:
        smallest = solve(peak, lambda s, a, b: True)
        assert smallest is not None
        return smallest[1], False
    slowest = fastest[0] * (1 + 1e-9)
    lean = solve(peak, lambda s, a, b: fits(s, a, b) and time(s, a, b) <= slowest)
    return (lean or fastest)[1], True


# -- the whole job ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """Bytes one optimizer step sends (all replicas together)."""

    between_stages: int
    across_nodes: int
    lora_allreduce: int
    lora_allreduce_across_nodes: int


@dataclass
class JobPlan:
    """What `pipelora-k8s plan` prints, and what `validate`/`submit` check."""

    model: ModelShape
    run: RunShape
    bounds: tuple[int, ...]
    stages: list[StageEstimate]
    gpu_memory_bytes: int | None
    flop_rate: float | None  # sustained FLOP/s the stage times assume (device rate x efficiency)
    device_flops: float | None  # the device's rate, FLOP/s (MFU's denominator)
    model_flops_per_token: float
    traffic: Traffic
    fits: bool = True
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)

    @property
    def bubble(self) -> float:
        p, m = self.run.stages, self.run.micro_batches
        return (p - 1) / (m + p - 1)

    @property
    def step_seconds(self) -> float | None:
        times = [s.seconds_per_micro_batch for s in self.stages]
        if any(t is None for t in times):
            return None
        return (self.run.micro_batches + self.run.stages - 1) * max(t for t in times if t is not None)

    @property
    def tokens_per_step(self) -> int:
        return self.run.tokens * self.run.micro_batches * self.run.data_parallel

    @property
    def tokens_per_s(self) -> float | None:
        step = self.step_seconds
        return self.tokens_per_step / step if step else None

    @property
    def mfu(self) -> float | None:
        tps = self.tokens_per_s
        if tps is None or not self.device_flops:
            return None
        return self.model_flops_per_token * tps / self.run.world_size / self.device_flops


def item_label(item: int, layers: int) -> str:
    if item == 0:
        return "embed"
    return "norm+head" if item == layers + 1 else f"layer {item - 1}"


def describe(first: int, stop: int, layers: int) -> str:
    """`embed, layers 0-5`, `layers 6-7, norm+head`: what a stage holds."""
    items = range(first, stop)
    inner = [i - 1 for i in items if 0 < i <= layers]
    parts = ["embed"] if 0 in items else []
    if inner:
        parts.append(f"layers {inner[0]}-{inner[-1]}" if len(inner) > 1 else f"layer {inner[0]}")
    if layers + 1 in items:
        parts.append("norm+head")
    return ", ".join(parts)


def traffic(model: ModelShape, run: RunShape, stages: Sequence[StageEstimate]) -> Traffic:
    """Activations forward and gradients back across each stage boundary, every micro-batch; and the
    LoRA gradient all-reduce (ring) among a stage's replicas once a step."""
    p, g, dp = run.stages, run.gpus_per_node, run.data_parallel
    per_boundary = run.micro_batches * run.tokens * (2 * model.hidden * run.dtype_bytes + 8)

    def node(rank: int) -> int:
        return rank // g

    crossing = sum(1 for r in range(dp) for s in range(p - 1) if node(r * p + s) != node(r * p + s + 1))
    allreduce = allreduce_across = 0
    if dp > 1:
        for est in stages:
            grad_bytes = 4 * est.lora_params
            per_edge = 2 * (dp - 1) / dp * grad_bytes
            allreduce += int(dp * per_edge)
            ranks = [r * p + est.stage for r in range(dp)]
            edges = sum(1 for i in range(dp) if node(ranks[i]) != node(ranks[(i + 1) % dp]))
            allreduce_across += int(edges * per_edge)
    return Traffic(between_stages=dp * (p - 1) * per_boundary, across_nodes=crossing * per_boundary,
                   lora_allreduce=allreduce, lora_allreduce_across_nodes=allreduce_across)


def plan_job(model: ModelShape, run: RunShape, *, gpu_memory_bytes: int | None = None,
             device_flops: float | None = None, efficiency: float = 0.5, reserve_bytes: int | None = None,
             suggest: bool = True) -> JobPlan:
    """Cut, memory, time and traffic of a job; with `gpu_memory_bytes`, whether every stage fits
    and, when one does not, the smallest changes that make it fit (each checked by this function)."""
    if run.stages > model.layers:
        raise TrainerError(
            f"parallel.stages is {run.stages} but the model has {model.layers} decoder layer"
            f"{'s' if model.layers != 1 else ''}; use at most {model.layers} stages")
    reserve = RESERVE_BYTES[run.device] if reserve_bytes is None else reserve_bytes
    items = item_costs(model, run)
    bounds, fits = cut(items, run, hidden=model.hidden, budget_bytes=gpu_memory_bytes, reserve_bytes=reserve)
    rate = device_flops * efficiency if device_flops else None
    stages = estimate_stages(model, run, bounds, reserve_bytes=reserve, flop_rate=rate)
    out = JobPlan(model=model, run=run, bounds=bounds, stages=stages, gpu_memory_bytes=gpu_memory_bytes,
                  flop_rate=rate, device_flops=device_flops,
                  model_flops_per_token=sum(i.model_flops for i in items),
                  traffic=traffic(model, run, stages), fits=fits)
    if not fits and gpu_memory_bytes is not None:
        worst = max(stages, key=lambda s: s.peak_bytes)
        over = len([s for s in stages if s.peak_bytes > gpu_memory_bytes]) - 1
        others = f"; {over} more stage{'s do' if over > 1 else ' does'} not fit either" if over else ""
        fixes = suggest_fixes(model, run, gpu_memory_bytes=gpu_memory_bytes, reserve_bytes=reserve) if suggest else []
        out.fixes = fixes
        advice = ("use " + ", or ".join(fixes)) if fixes else (
            "no change of stages, seq_len, micro_batch_size or activation checkpointing fits it; "
            "use GPUs with more memory")
        out.problems.append(
            f"stage {worst.stage + 1} needs {worst.peak_bytes / GIB:.1f} GiB of {gpu_memory_bytes / GIB:g} GiB "
            f"(weights {worst.weight_bytes / GIB:.1f}, activations and buffers {worst.activation_bytes / GIB:.1f} with "
            f"{worst.in_flight} micro-batch{'es' if worst.in_flight != 1 else ''} in flight{others}): {advice}")
    return out


def _fits(model: ModelShape, run: RunShape, *, gpu_memory_bytes: int, reserve_bytes: int) -> bool:
    if run.stages > model.layers:
        return False
    items = item_costs(model, run)
    return cut(items, run, hidden=model.hidden, budget_bytes=gpu_memory_bytes, reserve_bytes=reserve_bytes)[1]


def _seq_step(seq_len: int) -> int:
    return 256 if seq_len > 1024 else 64 if seq_len > 128 else 8


def suggest_fixes(model: ModelShape, run: RunShape, *, gpu_memory_bytes: int, reserve_bytes: int) -> list[str]:
    """The smallest change of each kind that makes every stage fit, as command-line flags.

    More stages (first on the same GPUs, trading data parallelism; then on more nodes), a shorter
    seq_len, activation checkpointing, a smaller micro-batch; each is accepted by `plan_job`.
    """
    fixes: list[str] = []

    def ok(candidate: RunShape) -> bool:
        return _fits(model, candidate, gpu_memory_bytes=gpu_memory_bytes, reserve_bytes=reserve_bytes)

    dp, g = run.data_parallel, run.gpus_per_node
    for stages in range(run.stages + 1, model.layers + 1):
        if run.world_size % stages == 0:
            nodes = run.nodes
        elif (stages * dp) % g == 0:
            nodes = stages * dp // g
        else:
            continue
        micro = max(run.micro_batches, stages)
        candidate = replace(run, stages=stages, nodes=nodes, micro_batches=micro)
        if ok(candidate):
            flags = f"--stages {stages}"
            if nodes != run.nodes:
                flags += f" --nodes {nodes}"
            if micro != run.micro_batches:
                flags += f" --micro-batches {micro}"
            fixes.append(flags)
            break
    step = _seq_step(run.seq_len)
    seq = (run.seq_len - 1) // step * step
    while seq >= step:
        if ok(replace(run, seq_len=seq)):
            fixes.append(f"--set dataset.seq_len={seq}")
            break
        seq -= step
    if not run.activation_checkpointing and ok(replace(run, activation_checkpointing=True)):
        fixes.append("--set training.activation_checkpointing=true")
    for size in range(run.micro_batch_size - 1, 0, -1):
        if ok(replace(run, micro_batch_size=size)):
            fixes.append(f"--set parallel.micro_batch_size={size}")
            break
    return fixes


def plan_problems(spec: Any, config: Mapping[str, Any] | Any, *, gpu_memory_gib: float,
                  device: Device = "cuda", reserve_gib: float | None = None) -> list[str]:
    """One sentence per stage that would not fit in `gpu_memory_gib`, with the changes that fix it:
    what `validate` and `submit` run once the GPU's memory is known (no torch, no weights)."""
    model = ModelShape.from_config(config)
    run = RunShape.from_spec(spec, device=device)
    if run.stages > model.layers:
        return [f"parallel.stages is {run.stages} but the model has {model.layers} decoder layers; "
                f"use at most {model.layers} stages"]
    reserve = None if reserve_gib is None else int(reserve_gib * GIB)
    return plan_job(model, run, gpu_memory_bytes=int(gpu_memory_gib * GIB), reserve_bytes=reserve).problems


def env_gpu_memory_bytes(environ: Mapping[str, str] | None = None) -> int | None:
    """`PIPELORA_GPU_MEMORY_GIB`: the memory per rank partitions must fit, when set."""
    value = (os.environ if environ is None else environ).get(GPU_MEMORY_ENV)
    return int(float(value) * GIB) if value else None


def env_device_flops(environ: Mapping[str, str] | None = None) -> float | None:
    """`PIPELORA_GPU_TFLOPS`: the device rate MFU is reported against, when set."""
    value = (os.environ if environ is None else environ).get(GPU_TFLOPS_ENV)
    return float(value) * 1e12 if value else None
