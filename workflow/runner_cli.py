"""`pipelora-k8s run`: the whole job on this machine (what `make demo` runs)."""

from __future__ import annotations

from pathlib import Path

import click

from pipelora.cli_common import spec_options
from pipelora.config import JobSpec


@click.command()
@spec_options
@click.option("--workdir", type=click.Path(file_okay=False), help="Where the resolved spec and hostfile go "
              "(default: <run folder>/local for local storage).")
@click.option("--make-missing/--no-make-missing", default=True, show_default=True,
              help="Create the tiny model and the generated dataset when their local paths do not exist.")
@click.option("--fresh", is_flag=True, help="Delete the previous run's checkpoints, adapter and progress first.")
def run(spec: JobSpec, workdir: str | None, make_missing: bool, fresh: bool) -> None:
    """Run a job here: dataprep, then mpirun over localhost, as the cluster's pods do.

    \b
    Example:
      pipelora-k8s run --config examples/local-tiny.yaml --fresh
    """
    from pipelora.workflow.runner import run_local

    run_local(spec, workdir=Path(workdir) if workdir else None, make_missing=make_missing, fresh=fresh,
              echo=click.echo)
