"""What every `pipelora-k8s` command shares: the spec options and how user errors are shown.

Each part (dataprep, trainer, workflow) defines its own click commands with these options, so
`--stages 8` means the same everywhere and the resolved spec is identical on every rank.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

import click

from pipelora.config import JobSpec, SpecWarning, load_spec, parse_set_option
from pipelora.errors import PipeloraError

F = TypeVar("F", bound=Callable[..., Any])

# CLI flag → dotted spec field. Flags override the file; `--set` overrides anything else.
FLAG_FIELDS = {
    "stages": "parallel.stages",
    "nodes": "parallel.nodes",
    "gpus_per_node": "parallel.gpus_per_node",
    "micro_batches": "parallel.micro_batches",
    "max_steps": "training.max_steps",
    "storage": "storage.uri",
    "image": "cluster.image",
}


def spec_options(func: F) -> F:
    """Add `--config` and the override flags; the command receives `spec: JobSpec`."""

    @click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                  help="The job spec YAML file.")
    @click.option("--stages", type=int, help="Pipeline stages (parallel.stages).")
    @click.option("--nodes", type=int, help="Worker nodes (parallel.nodes).")
    @click.option("--gpus-per-node", type=int, help="Ranks per node (parallel.gpus_per_node).")
    @click.option("--micro-batches", type=int, help="Micro-batches per step (parallel.micro_batches).")
    @click.option("--max-steps", type=int, help="Optimizer steps (training.max_steps).")
    @click.option("--storage", help="Storage root URI (storage.uri).")
    @click.option("--image", help="Trainer image (cluster.image).")
    @click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
                  help="Override any field, e.g. --set training.lr=1e-4 (repeatable).")
    @functools.wraps(func)
    def wrapper(*args: Any, config_path: str, set_items: tuple[str, ...], **kwargs: Any) -> Any:
        overrides = {FLAG_FIELDS[k]: kwargs.pop(k) for k in list(FLAG_FIELDS) if k in kwargs}
        overrides.update(dict(parse_set_option(item) for item in set_items))
        kwargs["spec"] = load_spec(config_path, overrides=overrides)
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def show_warnings() -> None:
    """Spec warnings print as one `warning:` line each, not Python's file:line format."""

    def _show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
              file: TextIO | None = None, line: str | None = None) -> None:
        prefix = "warning: " if issubclass(category, SpecWarning) else f"{category.__name__}: "
        print(prefix + str(message), file=sys.stderr)

    warnings.showwarning = _show


def run_cli(group: click.Group, argv: list[str] | None = None) -> None:
    """Run a click group, turning every PipeloraError into one `error:` message and its exit code."""
    show_warnings()
    try:
        group.main(args=argv, standalone_mode=False, prog_name="pipelora-k8s")
    except PipeloraError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(0)


def echo_spec(spec: JobSpec) -> None:
    click.echo(spec.to_yaml(), nl=False)
