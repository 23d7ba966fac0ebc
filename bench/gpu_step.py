"""One-stage LoRA training step of the 7B shape on one CUDA GPU, in bf16 at seq_len 2048.

Self-contained: the Mistral-7B-shaped model is built on the GPU with random weights through the
trainer's own layer classes (embedding, decoder layers with LoRA, norm + head), so no 14 GB
checkpoint is needed. Reports tokens/s and model FLOPs utilisation against the card's measured
bf16 matmul rate (not the datasheet peak). One JSON line per figure; --write adds a section to
docs/benchmarks.md.

    python bench/gpu_step.py --family mistral --seq-len 2048 --steps 6 --write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


class RandomWeights:
    """Stands in for CheckpointReader: every tensor a layer asks for, random, made on the GPU."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], *, device: torch.device, std: float) -> None:
        self.shapes, self.device, self.std = shapes, device, std
        self.bytes_read = 0

    def has(self, name: str) -> bool:
        return name in self.shapes

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            shape = self.shapes[name]
            if len(shape) == 1:
                out[name] = torch.ones(shape, device=self.device, dtype=torch.bfloat16)
            else:
                out[name] = torch.randn(shape, device=self.device, dtype=torch.bfloat16) * self.std
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, *, size: int = 8192, iters: int = 50) -> float:
    """The bf16 matmul rate this card sustains (the MFU denominator)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def flops_per_token(config: Any, *, seq_len: int, linear_params: int) -> dict[str, float]:
    """Per-token FLOPs: a LoRA step needs forward + input gradients (4N), no weight gradients for
    the frozen base; the usual full-training convention (6N) is reported alongside."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = 2 * 2 * config.num_attention_heads * head_dim * seq_len / 2 * config.num_hidden_layers  # causal
    return {"lora": 4 * linear_params + 2 * attn, "full_convention": 6 * linear_params + 3 * attn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="mistral", choices=["mistral", "llama"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--preset", default="7b", choices=["tiny", "small", "7b"],
                        help="7b is the benchmark; tiny checks the script itself (with --device cpu)")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a dry run)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench/gpu_step.py needs a CUDA GPU (or --device cpu --preset tiny for a dry run)")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)

    from pipelora.trainer.init_model import parameter_shapes
    from pipelora.trainer.layers import LocalModel, LoraSettings, build_layer, causal_lm_loss, lora_state
    from pipelora.trainer.lora import resolve_targets
    from pipelora.trainer.presets import preset_config

    peak = matmul_tflops(device) if device.type == "cuda" else matmul_tflops(device, size=512, iters=5)
    config = preset_config(args.family, args.preset)
    config._attn_implementation = "sdpa"
    shapes = dict(parameter_shapes(config))
    weights = RandomWeights(shapes, device=device, std=0.02)
    lora = LoraSettings(tuple(resolve_targets("all-linear")), args.lora_r, 2.0 * args.lora_r, 0.0, 0)
    layers = [build_layer(i, config=config, reader=weights, dtype=torch.bfloat16, device=device, lora=lora,  # type: ignore[arg-type]
                          activation_checkpointing=args.activation_checkpointing)
              for i in range(config.num_hidden_layers + 2)]
    model = LocalModel(layers).train()
    params = list(lora_state(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    linear_params = sum(v for k, s in shapes.items() if len(s) == 2 and "embed_tokens" not in k
                        for v in [int(torch.Size(s).numel())])
    if "lm_head.weight" not in shapes:
        linear_params += int(torch.Size(shapes["model.embed_tokens.weight"]).numel())
    b, s = args.micro_batch_size, args.seq_len
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=gen).to(device)
    pos = torch.arange(s, device=device).repeat(b, 1)
    times = []
    for step in range(args.steps):
        sync(device)
        start = time.perf_counter()
        for _ in range(args.micro_batches):
            loss = causal_lm_loss(model(ids, pos), ids) / args.micro_batches
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        print(f"step {step + 1}/{args.steps} {times[-1]:.3f}s", file=sys.stderr, flush=True)
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    tokens = b * s * args.micro_batches
    tps = tokens / steady
    flops = flops_per_token(config, seq_len=s, linear_params=linear_params)
    # Activation checkpointing recomputes the forward once more (2N per token).
    recompute = 2 * linear_params if args.activation_checkpointing else 0
    figures = {
        "bf16_matmul_tflops_measured": peak,
        "tokens_per_s": tps,
        "step_s": steady,
        "mfu_lora_flops": tps * flops["lora"] / (peak * 1e12),
        "hfu_with_recompute": tps * (flops["lora"] + recompute) / (peak * 1e12),
        "mfu_6n_convention": tps * flops["full_convention"] / (peak * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 1024**3 if device.type == "cuda" else 0.0,
    }
    meta = {"family": args.family, "seq_len": s, "micro_batch_size": b, "micro_batches": args.micro_batches,
            "activation_checkpointing": args.activation_checkpointing, "preset": args.preset,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    for name, value in figures.items():
        print(json.dumps({"figure": name, "value": round(value, 4), **meta}))
    if args.write:
        path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in figures.items())
        cmd = " ".join(["python bench/gpu_step.py", *sys.argv[1:]])
        text = text.rstrip("\n") + (f"\n\n## trainer (GPU step)\n\n`{cmd}` on {meta['gpu']}, {os.cpu_count()} CPU "
                                    f"cores; {args.preset} {args.family} shape, bf16, LoRA r={args.lora_r} all-linear.\n\n"
                                    "| figure | value |\n|---|---|\n" + rows + "\n")
        path.write_text(text)


if __name__ == "__main__":
    main()
