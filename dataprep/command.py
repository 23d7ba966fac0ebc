"""`pipelora-k8s dataprep` and `pipelora-k8s make-dataset`."""

from __future__ import annotations

import click

from pipelora.cli_common import spec_options
from pipelora.config import JobSpec


@click.command("dataprep")
@spec_options
@click.option("--overwrite", is_flag=True, help="Replace data prepared from other inputs.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Tokenizer processes; 0 tokenizes in this one [default: cores - 1 (at least 1) for datasets "
                   "over 8 MiB, else 0].")
def dataprep(spec: JobSpec, overwrite: bool, workers: int | None) -> None:
    """Tokenize, mask and pack the dataset into shards under <storage>/<name>/data/.

    Runs once per job (the trainer's ranks only read the shards). Identical inputs are a no-op.

    \b
    Example:
      pipelora-k8s dataprep --config examples/local-tiny.yaml
    """
    from pipelora.dataprep.pipeline import run_dataprep

    result = run_dataprep(spec, overwrite=overwrite, workers=workers)
    click.echo(result.summary)


@click.command("make-dataset")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--examples", default=2000, show_default=True, type=click.IntRange(min=1), help="Records.")
@click.option("--seed", default=0, show_default=True, type=int, help="Generator seed.")
def make_dataset(out: str, examples: int, seed: int) -> None:
    """Write the generated learnable Alpaca dataset (sums, word reversal, table lookups) as JSONL.

    \b
    Example:
      pipelora-k8s make-dataset --out runs/datasets/learnable.jsonl --examples 2000
    """
    from pipelora.dataprep.generate import write_learnable_dataset

    path = write_learnable_dataset(out, examples=examples, seed=seed)
    click.echo(f"wrote {examples} examples to {path}")
