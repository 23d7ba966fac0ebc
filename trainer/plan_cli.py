"""`pipelora-k8s plan`: whether a job fits its GPUs, and how fast it will run, before it is submitted.

Reads the model's `config.json` alone (no weights, no torch), cuts the model as the trainer will,
and prints per stage what it holds and needs; a job whose stage would not fit is refused with the
smallest changes that make it fit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from pipelora.cli_common import spec_options
from pipelora.config import JobSpec
from pipelora.trainer.errors import TrainerError
from pipelora.trainer.memory import (
    GIB,
    GPU_MEMORY_ENV,
    GPU_TFLOPS_ENV,
    RESERVE_BYTES,
    Device,
    JobPlan,
    ModelShape,
    RunShape,
    describe,
    plan_job,
)


def read_config(spec: JobSpec, model_config: str | None) -> dict[str, Any]:
    """The model's `config.json`: from `--model-config` (a file or a model folder), else from model.uri
    (storage, or for an hf:// model its mirror in storage or the Hub)."""
    if model_config:
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainerError(f"cannot read the model config {path}: {exc}; pass a config.json file "
                               "or a Hugging Face model folder") from None
    else:
        from pipelora.errors import PipeloraError
        from pipelora.storage import join_uri, storage_for

        uri = join_uri(spec.model.uri, "config.json")
        try:
            if spec.model.uri.startswith("hf://"):  # the run's committed mirror, else the Hub itself
                from pipelora.hub import read_model_config

                data = read_model_config(spec)
            else:
                data = storage_for(spec, spec.model.uri).read_json(uri)
        except PipeloraError as exc:
            raise TrainerError(f"cannot read the model config: {exc}; pass --model-config with a local copy of "
                               "its config.json") from None
    if not isinstance(data, dict) or "num_hidden_layers" not in data:
        raise TrainerError("the model config is not a decoder model's config.json (no num_hidden_layers)")
    return data


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def render(plan: JobPlan, *, name: str) -> str:
    """The plan as a table per stage and a summary."""
    m, r = plan.model, plan.run
    unit, scale = ("GiB", GIB) if max(s.peak_bytes for s in plan.stages) >= GIB else ("MiB", 1024**2)
    dtype = {2: "bf16", 4: "fp32"}.get(r.dtype_bytes, f"{r.dtype_bytes}-byte")
    targets = m.targets(r.lora_targets)
    params = m.layers * m.layer_params() + 2 * m.vocab * m.hidden + m.hidden
    lines = [
        f"plan for {name}: {m.model_type} {_count(params)} parameters ({m.layers} layers, hidden {m.hidden}, "
        f"vocab {m.vocab}), {dtype}, {r.micro_batch_size} x {r.seq_len} tokens per micro-batch, "
        f"{r.micro_batches} micro-batches per step; LoRA r={r.lora_r} on {len(targets)} linear layers"
        f"{' with dropout' if r.lora_dropout else ''}; activation checkpointing "
        f"{'on' if r.activation_checkpointing else 'off'}",
        f"{r.stages} stage{'s' if r.stages != 1 else ''} x {r.data_parallel} data-parallel on {r.nodes} node"
        f"{'s' if r.nodes != 1 else ''} x {r.gpus_per_node} {'GPUs' if r.device == 'cuda' else 'ranks'}; "
        + (f"{plan.gpu_memory_bytes / GIB:g} GiB per GPU" if plan.gpu_memory_bytes else "GPU memory not given")
        + f", {_bytes(plan.stages[0].reserve_bytes)} of it for the runtime; "
        + (f"stage times at {plan.device_flops / 1e12:g} TFLOP/s x {plan.flop_rate / plan.device_flops:.2f} "
           "efficiency" if plan.device_flops and plan.flop_rate else "no device rate given (--gpu-tflops)"),
        "",
        f"stage  {'items':<24} {'params':>8} {'weights':>8} {'LoRA':>8} {'optim':>8} {'act/mb':>8} "
        f"{'ckpt/mb':>8} {'flight':>6} {'peak':>8} {'of GPU':>6} {'GFLOP/tok':>9} {'ms/mb':>8}",
        f"{'':5}  {'':<24} {'':>8} {'(' + unit + ')':>8} {'':>8} {'':>8} {'':>8} {'':>8} {'':>6} "
        f"{'(' + unit + ')':>8} {'':>6} {'':>9} {'':>8}",
    ]
    for s in plan.stages:
        share = f"{s.peak_bytes / plan.gpu_memory_bytes:.0%}" if plan.gpu_memory_bytes else "-"
        ms = f"{s.seconds_per_micro_batch * 1e3:.1f}" if s.seconds_per_micro_batch is not None else "-"
        mark = " *" if plan.gpu_memory_bytes and s.peak_bytes > plan.gpu_memory_bytes else ""
        lines.append(
            f"{s.stage + 1:>5}  {describe(s.first, s.stop, m.layers):<24} {_count(s.params):>8} "
            f"{s.weight_bytes / scale:>8.2f} {s.lora_bytes / scale:>8.3f} {s.optimizer_bytes / scale:>8.3f} "
            f"{s.act_bytes / scale:>8.3f} {s.act_ckpt_bytes / scale:>8.3f} {s.in_flight:>6} "
            f"{s.peak_bytes / scale:>8.2f} {share:>6} {s.flops_per_token / 1e9:>9.3f} {ms:>8}{mark}")
    lines.append("")
    lines.append("act/mb, ckpt/mb: activations one micro-batch keeps without and with activation checkpointing; "
                 "flight: micro-batches in flight under 1F1B; peak: weights + LoRA + optimizer + flight x activations "
                 "+ pipeline buffers + the largest backward's working memory + runtime")
    p, mb = r.stages, r.micro_batches
    lines.append(f"bubble: (p-1)/(m+p-1) = {p - 1}/{mb + p - 1} = {plan.bubble:.1%} of each step")
    t = plan.traffic
    lines.append(f"sent per step: {_bytes(t.between_stages)} between stages ({_bytes(t.across_nodes)} across nodes); "
                 f"LoRA gradient all-reduce {_bytes(t.lora_allreduce)} ({_bytes(t.lora_allreduce_across_nodes)} "
                 "across nodes)")
    step = plan.step_seconds
    lines.append(f"model FLOPs: {plan.model_flops_per_token / 1e9:.3f} GFLOP/token "
                 "(4 N_frozen + 6 N_lora + 12 L H d S; what MFU counts)")
    if step is not None and plan.tokens_per_s is not None:
        slowest = max(plan.stages, key=lambda s: s.seconds_per_micro_batch or 0.0)
        mfu = plan.mfu
        lines.append(
            f"predicted step: {step:.3f} s = ({mb} + {p} - 1) x {(slowest.seconds_per_micro_batch or 0) * 1e3:.1f} ms "
            f"(stage {slowest.stage + 1}); {plan.tokens_per_s:,.0f} tokens/s, "
            f"{plan.tokens_per_s / r.world_size:,.0f} per GPU" + (f", MFU {mfu:.1%}" if mfu is not None else "")
            + "; communication not included")
    if plan.gpu_memory_bytes:
        if plan.fits:
            lines.append(f"fits: every stage's predicted peak is within {plan.gpu_memory_bytes / GIB:g} GiB")
        else:
            lines.append("does not fit (*): no cut into these stages fits; shown is the cut with the smallest peak")
    return "\n".join(lines)


def as_json(plan: JobPlan) -> dict[str, Any]:
    out = dataclasses.asdict(plan)
    out.update(bubble=plan.bubble, step_seconds=plan.step_seconds, tokens_per_s=plan.tokens_per_s, mfu=plan.mfu,
               tokens_per_step=plan.tokens_per_step)
    for s in out["stages"]:
        s["items"] = describe(s["first"], s["stop"], plan.model.layers)
    return out


@click.command("plan")
@spec_options
@click.option("--gpu-memory-gib", type=float, envvar=GPU_MEMORY_ENV, show_envvar=True,
              help="Memory of one GPU; every stage's predicted peak must fit it.")
@click.option("--gpu-tflops", type=float, envvar=GPU_TFLOPS_ENV, show_envvar=True,
              help="The GPU's dense matmul rate in the run dtype (bf16: 989 for an H100 SXM), for stage times and MFU.")
@click.option("--efficiency", type=click.FloatRange(0.01, 1.0), default=0.5, show_default=True,
              help="Fraction of --gpu-tflops the stages' FLOPs reach (the MFU the training log reports, over the "
                   "predicted MFU at 1.0, tells the real one).")
@click.option("--reserve-gib", type=float, default=None,
              help="Memory per GPU kept for the CUDA context, NCCL and the allocator (default 2; 0 on CPU).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="Where the job runs (decides dtype 'auto' and the runtime reserve).")
@click.option("--model-config", type=click.Path(exists=True),
              help="A local config.json (or model folder) instead of model.uri's.")
@click.option("--json", "as_json_", is_flag=True, help="Print the plan as JSON.")
def plan(spec: JobSpec, gpu_memory_gib: float | None, gpu_tflops: float | None, efficiency: float,
         reserve_gib: float | None, device: Device, model_config: str | None, as_json_: bool) -> None:
    """Predict each stage's memory and time from the model's config.json; refuse a job that does not fit.

    Per stage: items, parameters, weight, LoRA and optimizer bytes, activations per micro-batch with
    and without activation checkpointing, micro-batches in flight under 1F1B, predicted peak
    against the GPU's memory, and time; then the pipeline bubble, bytes sent per step, the step
    time and tokens/s. Exits non-zero, naming the stage and the changes that fix it, when a stage
    would not fit.

    \b
    Example:
      pipelora-k8s plan --config examples/mistral-7b-alpaca.yaml --gpu-memory-gib 24 --gpu-tflops 165
      pipelora-k8s plan --config job.yaml --stages 4 --model-config runs/models/mistral-7b
    """
    config = read_config(spec, model_config)
    model = ModelShape.from_config(config)
    run = RunShape.from_spec(spec, device=device)
    if gpu_memory_gib is None:
        gpu_memory_gib = spec.cluster.gpu_memory_gib
    reserve = RESERVE_BYTES[device] if reserve_gib is None else int(reserve_gib * GIB)
    result = plan_job(model, run, gpu_memory_bytes=int(gpu_memory_gib * GIB) if gpu_memory_gib else None,
                      device_flops=gpu_tflops * 1e12 if gpu_tflops else None, efficiency=efficiency,
                      reserve_bytes=reserve)
    click.echo(json.dumps(as_json(result), indent=2) if as_json_ else render(result, name=spec.name))
    if result.problems:
        raise TrainerError(result.problems[0])


def check_fits(spec: JobSpec, gpu_memory_gib: float) -> None:
    """What `validate` and `submit --gpu-memory-gib` run: every stage must fit, else one sentence per
    stage that does not, with the smallest changes that fix it (the `plan` command's check)."""
    from pipelora.config import ConfigError
    from pipelora.trainer.memory import plan_problems

    problems = plan_problems(spec, read_config(spec, None), gpu_memory_gib=gpu_memory_gib)
    if problems:
        raise ConfigError(problems)
