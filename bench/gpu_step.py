"""One-stage LoRA training step of the 7B shape on one CUDA GPU, in bf16 on packed rows; dense
masks against flex attention.

Self-contained: the Mistral-7B-shaped model is built on the GPU with random weights through the
trainer's own layer classes (embedding, decoder layers with LoRA, norm + head), so no 14 GB
checkpoint is needed. Rows are packed as dataprep packs them (several sequences per row, positions
restarting at each), so the attention mask is the trainer's. Each attention kernel
(`pipelora.trainer.attention`: the dense block-diagonal mask, flex attention's block mask) is
timed on the same model and rows; reported per kernel: tokens/s, step time, peak memory and MFU
with the trainer's FLOPs count (`pipelora.trainer.memory.model_flops_per_token`, recomputation
excluded, as torchtitan counts it) against the card's measured bf16 matmul rate (or
PIPELORA_GPU_TFLOPS), then flex/dense. One JSON line per figure; --write adds a section to
docs/benchmarks.md.

    python bench/gpu_step.py --family mistral --seq-len 4096 --steps 6 --write
    python bench/gpu_step.py --device cpu --preset tiny --attention dense --steps 2   # checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

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


def packed_positions(batch: int, seq_len: int, *, mean_length: int, seed: int) -> torch.Tensor:
    """position_ids of rows packed like dataprep's: sequence lengths drawn around `mean_length`,
    each row filled to `seq_len`, positions restarting at 0 for each sequence."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths: list[int] = []
        while sum(lengths) < seq_len:
            n = int(torch.randint(mean_length // 4, mean_length * 7 // 4 + 1, (1,), generator=gen))
            lengths.append(min(n, seq_len - sum(lengths)))
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows)


def time_steps(model: torch.nn.Module, params: list[torch.nn.Parameter], ids: torch.Tensor, pos: torch.Tensor, *,
               steps: int, micro_batches: int, device: torch.device, label: str) -> float:
    """Median step time after the first (compilation, allocation) of `steps` optimizer steps."""
    from pipelora.trainer.layers import causal_lm_loss

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for step in range(steps):
        sync(device)
        start = time.perf_counter()
        for _ in range(micro_batches):
            loss = causal_lm_loss(model(ids, pos), ids) / micro_batches
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        print(f"{label}: step {step + 1}/{steps} {times[-1]:.3f}s", file=sys.stderr, flush=True)
    rest = sorted(times[1:]) or times
    return rest[len(rest) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="mistral", choices=["mistral", "llama", "llama3", "qwen2", "qwen3",
                                                                 "gemma2", "gemma3"])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--mean-sequence", type=int, default=350,
                        help="mean tokens per packed sequence (Alpaca's examples average about 300)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--attention", default="both", choices=["both", "dense", "flex"],
                        help="the kernels to time (flex has no backward on CPU)")
    parser.add_argument("--preset", default="7b", choices=["tiny", "small", "7b"],
                        help="7b is the benchmark; tiny checks the script itself (with --device cpu)")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a dry run)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench/gpu_step.py needs a CUDA GPU (or --device cpu --preset tiny --attention dense for a dry run)")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    elif args.attention != "dense":
        sys.exit("flex attention has no backward pass on CPU: use --attention dense with --device cpu")

    from pipelora.trainer import attention
    from pipelora.trainer.init_model import parameter_shapes
    from pipelora.trainer.layers import LocalModel, LoraSettings, build_layer, lora_state
    from pipelora.trainer.lora import resolve_targets
    from pipelora.trainer.memory import ModelShape, RunShape, model_flops_per_token
    from pipelora.trainer.presets import preset_config
    from pipelora.trainer.progress import device_rate

    dtype = torch.bfloat16
    rate, rate_source = device_rate(device, dtype)
    config = preset_config(args.family, args.preset)  # type: ignore[arg-type]
    os.environ[attention.ATTENTION_ENV] = "dense"
    attention.use_kernel(config, device)
    shapes = dict(parameter_shapes(config))
    weights = RandomWeights(shapes, device=device, std=0.02)
    lora = LoraSettings(tuple(resolve_targets("all-linear")), args.lora_r, 2.0 * args.lora_r, 0.0, 0)
    layers = [build_layer(i, config=config, reader=weights, dtype=dtype, device=device, lora=lora,  # type: ignore[arg-type]
                          activation_checkpointing=args.activation_checkpointing)
              for i in range(config.num_hidden_layers + 2)]
    model = LocalModel(layers).train()
    params = list(lora_state(model).values())
    b, s = args.micro_batch_size, args.seq_len
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=gen).to(device)
    pos = packed_positions(b, s, mean_length=args.mean_sequence, seed=1).to(device)
    sequences = int((pos == 0).sum())
    tokens = b * s * args.micro_batches
    figures: dict[str, float] = {"matmul_tflops": rate / 1e12}
    # What MFU counts is the model's work, the same whichever kernel computes attention.
    run = RunShape(seq_len=s, micro_batch_size=b, micro_batches=args.micro_batches, dtype_bytes=2,
                   lora_r=args.lora_r, activation_checkpointing=args.activation_checkpointing,
                   device="cuda" if device.type == "cuda" else "cpu")
    flops = model_flops_per_token(ModelShape.from_config(config), run)
    figures["model_gflop_per_token"] = flops / 1e9
    kernels = ["dense", "flex"] if args.attention == "both" else [args.attention]
    for kernel in kernels:
        os.environ[attention.ATTENTION_ENV] = kernel
        attention.use_kernel(config, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_s = time_steps(model, params, ids, pos, steps=args.steps, micro_batches=args.micro_batches,
                            device=device, label=kernel)
        tps = tokens / step_s
        figures[f"{kernel}_tokens_per_s"] = tps
        figures[f"{kernel}_step_s"] = step_s
        figures[f"{kernel}_mfu_percent"] = 100 * tps * flops / rate
        figures[f"{kernel}_peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) / 1024**3
                                             if device.type == "cuda" else 0.0)
    if len(kernels) == 2:
        figures["flex_over_dense_tokens_per_s"] = figures["flex_tokens_per_s"] / figures["dense_tokens_per_s"]
    meta = {"family": args.family, "seq_len": s, "sequences_per_micro_batch": sequences, "micro_batch_size": b,
            "micro_batches": args.micro_batches, "activation_checkpointing": args.activation_checkpointing,
            "preset": args.preset, "rate": rate_source,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    for name, value in figures.items():
        print(json.dumps({"figure": name, "value": round(value, 4), **meta}))
    if args.write:
        path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in figures.items())
        cmd = " ".join(["python bench/gpu_step.py", *sys.argv[1:]])
        text = text.rstrip("\n") + (f"\n\n## trainer (GPU step)\n\n`{cmd}` on {meta['gpu']}, {os.cpu_count()} CPU "
                                    f"cores; {args.preset} {args.family} shape, bf16, LoRA r={args.lora_r} all-linear, "
                                    f"{sequences} packed sequences per micro-batch; MFU against {rate_source}.\n\n"
                                    "| figure | value |\n|---|---|\n" + rows + "\n")
        path.write_text(text)


if __name__ == "__main__":
    main()
