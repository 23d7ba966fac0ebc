"""`pipelora-k8s train` (one process per rank) and `pipelora-k8s init-model`."""

from __future__ import annotations

import os
import sys

import click

from pipelora.cli_common import spec_options
from pipelora.config import JobSpec
from pipelora.errors import PipeloraError


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
@click.option("--family", type=click.Choice(["mistral", "llama"]), default="mistral", show_default=True)
@click.option("--preset", type=click.Choice(["tiny", "small", "7b"]), default="tiny", show_default=True,
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
