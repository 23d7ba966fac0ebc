"""`pipelora-k8s train` (one process per rank), `init-model` and `export`."""

from __future__ import annotations

import os
import sys

import click

from pipelora.cli_common import spec_options
from pipelora.config import JobSpec
from pipelora.errors import PipeloraError
from pipelora.trainer.presets import FAMILIES, PRESETS


@click.command()
@spec_options
def train(spec: JobSpec) -> None:
    """Train LoRA adapters with DeepSpeed pipeline parallelism (run once per rank).

    Started by mpirun (or torchrun / the deepspeed launcher); rank and world come from the
    launcher's environment. Resumes from the newest committed checkpoint by itself.

    \b
    Example:
      mpirun -np 2 pipelora-k8s train --config job.yaml --stages 2 --gpus-per-node 2
    """
    from pipelora.trainer.errors import Preempted
    from pipelora.trainer.loop import train as run_training
    from pipelora.trainer.ranks import discover

    try:
        run_training(spec)
    except Preempted as exc:
        click.echo(f"[rank {discover().rank}] {exc}", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.exit_code)
    except PipeloraError as exc:
        # Other ranks may be inside collectives: leave at once so the launcher ends the job.
        rank = discover().rank
        click.echo(f"error: [rank {rank}] {exc}", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.exit_code)


@click.command("init-model")
@click.option("--family", type=click.Choice(FAMILIES), default="mistral", show_default=True,
              help="mistral; llama (Llama 2); llama3 (rope scaling); qwen2 (Qwen2/2.5); qwen3; gemma2; "
                   "gemma3 (its text model).")
@click.option("--preset", type=click.Choice(PRESETS), default="tiny", show_default=True,
              help="tiny: tests; small: ~100M parameters (CPU benchmarks); 7b: the 7B shape (GPU benchmarks).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--weights/--no-weights", default=None,
              help="Write random weights (default: yes, except for 7b, which writes the config and tokenizer only).")
@click.option("--max-shard-mb", type=int, default=2048, show_default=True, help="Largest safetensors shard.")
def init_model(family: str, preset: str, out: str, seed: int, weights: bool | None, max_shard_mb: int) -> None:
    """Write a random-weight model in Hugging Face layout, with the real Mistral tokenizer.

    \b
    Example:
      pipelora-k8s init-model --family mistral --preset tiny --out runs/models/tiny-mistral
    """
    from pipelora.trainer.init_model import write_random_model

    if weights is None:
        weights = preset != "7b"
    path = write_random_model(out, family=family, preset=preset, seed=seed, weights=weights,  # type: ignore[arg-type]
                              max_shard_bytes=max_shard_mb * 1024 * 1024)
    click.echo(f"wrote {family} {preset} model to {path}" + ("" if weights else " (config and tokenizer only)"))


@click.command("export")
@spec_options
@click.option("--merge", is_flag=True,
              help="Merge the adapter into the base model: a Hugging Face folder (sharded safetensors + index, the "
                   "base dtype, config and tokenizer) that needs no PEFT to serve.")
@click.option("--step", type=int, default=None,
              help="Export the LoRA weights of this committed checkpoint step instead of the final adapter.")
@click.option("--out", default=None,
              help="Folder or s3:// URI to write (default: a folder in <run>/export/ named merged or after the "
                   "adapter folder, with the step folder's name appended for --step).")
@click.option("--overwrite", is_flag=True, help="Replace what --out holds (a committed export included).")
def export(spec: JobSpec, merge: bool, step: int | None, out: str | None, overwrite: bool) -> None:
    """Export the run's adapter (PEFT files), or the base model with it merged in.

    Either way the folder is committed (a marker naming every file is written last). The merge
    streams one base shard at a time, so it needs memory for about one weight and local disk
    for one shard.

    \b
    Example:
      pipelora-k8s export --config job.yaml --merge
      pipelora-k8s export --config job.yaml --step 200 --out s3://bucket/adapters/run-at-200
    """
    from pipelora.trainer.export import describe, export_adapter, export_merged

    if merge:
        result = export_merged(spec, step=step, out=out, overwrite=overwrite)
    else:
        result = export_adapter(spec, step=step, out=out, overwrite=overwrite)
    click.echo(describe(result))
