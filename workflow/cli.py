"""The `pipelora-k8s` entry point.

Commands of the other parts (dataprep, train, init-model) are registered by module path and
imported only when run, so `pipelora-k8s status` does not pay for importing torch, and
`workflow` does not depend on the trainer's code (DESIGN.md, dependency direction).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable

import click

from pipelora import __version__
from pipelora.cli_common import echo_spec, run_cli, spec_options
from pipelora.config import JobSpec, check_against_model, json_schema
from pipelora.launch import pod_env_file, pod_runtime_dir
from pipelora.podenv import apply_pod_env

# name → "module:attribute" of a click command; imported on first use.
LAZY_COMMANDS: dict[str, str] = {
    "dataprep": "pipelora.dataprep.command:dataprep",
    "make-dataset": "pipelora.dataprep.command:make_dataset",
    "train": "pipelora.trainer.command:train",
    "init-model": "pipelora.trainer.command:init_model",
    "plan": "pipelora.trainer.plan_cli:plan",
    "export": "pipelora.trainer.command:export",
}
# The cluster commands and the local runner (this package); kept light to import.
WORKFLOW_COMMANDS: dict[str, str] = {
    "submit": "pipelora.workflow.cluster_cli:submit",
    "render": "pipelora.workflow.cluster_cli:render",
    "status": "pipelora.workflow.cluster_cli:status",
    "logs": "pipelora.workflow.cluster_cli:logs",
    "delete": "pipelora.workflow.cluster_cli:delete",
    "list": "pipelora.workflow.cluster_cli:list_jobs",
    "wait-for-data": "pipelora.workflow.cluster_cli:wait_for_data_cmd",
    "release-training": "pipelora.workflow.cluster_cli:release_training",
    "run": "pipelora.workflow.runner_cli:run",
    "worker": "pipelora.workflow.worker_cli:worker",
    "pod-env": "pipelora.workflow.worker_cli:pod_env",
}
LAZY_COMMANDS.update(WORKFLOW_COMMANDS)


class LazyGroup(click.Group):
    """A click group whose heavy subcommands are imported only when invoked (or listed in help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pipelora-k8s")
def cli() -> None:
    """Pipeline-parallel LoRA fine-tuning with DeepSpeed, on Kubernetes or on this machine.

    \b
    Example:
      pipelora-k8s validate --config job.yaml --stages 8 --nodes 2
      pipelora-k8s submit --config job.yaml --stages 8 --nodes 2
    """


def gpu_memory_option(command: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--gpu-memory-gib", type=click.FloatRange(min=1), envvar="PIPELORA_GPU_MEMORY_GIB", default=None,
        help="Memory of one GPU: refuse a job whose pipeline stages would not fit (as `plan` predicts).",
    )(command)


def check_fits(spec: JobSpec, gpu_memory_gib: float | None) -> None:
    """The `plan` command's fit check, run through that command's module (it reads only config.json),
    against `--gpu-memory-gib` or else the spec's `cluster.gpu_memory_gib`; nothing when neither is known."""
    if gpu_memory_gib is None:
        gpu_memory_gib = spec.cluster.gpu_memory_gib
    if gpu_memory_gib is not None:
        importlib.import_module("pipelora.trainer.plan_cli").check_fits(spec, gpu_memory_gib)


@cli.command()
@spec_options
@gpu_memory_option
def validate(spec: JobSpec, gpu_memory_gib: float | None) -> None:
    """Check a job spec and print it resolved (file, then flags); every problem is listed.

    \b
    Example:
      pipelora-k8s validate --config examples/mistral-7b-alpaca.yaml --stages 8 --nodes 2
    """
    check_against_model(spec)
    check_fits(spec, gpu_memory_gib)
    echo_spec(spec)


@cli.command()
def schema() -> None:
    """Print the job spec's JSON schema (for editor completion and checks).

    \b
    Example:
      pipelora-k8s schema > job.schema.json
      # then in job.yaml:  # yaml-language-server: $schema=job.schema.json
    """
    click.echo(json.dumps(json_schema(), indent=2))


def main(argv: list[str] | None = None) -> None:
    # A rank that sshd started on a worker pod takes the pod's recorded environment first (IRSA,
    # NCCL_*, HF_*...), before any library reads it; elsewhere there is no such file.
    apply_pod_env(pod_env_file(pod_runtime_dir()), os.environ)
    run_cli(cli, argv)


if __name__ == "__main__":
    main()
