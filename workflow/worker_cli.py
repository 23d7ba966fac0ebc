"""The commands that run inside a worker pod: its entrypoint, and what a rank would see."""

from __future__ import annotations

import os
import re
import sys

import click

from pipelora import podenv
from pipelora.launch import pod_env_file, pod_runtime_dir
from pipelora.podenv import apply_pod_env, recorded_names
from pipelora.workflow.worker import DEFAULT_SSHD_CONFIG, WorkerEntrypoint

SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|KEY_ID|SESSION", re.I)


@click.command()
@click.option("--sshd-config", default=DEFAULT_SSHD_CONFIG, show_default=True, help="sshd's configuration file.")
@click.option("--sshd", "sshd_bin", default="/usr/sbin/sshd", show_default=True, help="The sshd binary.")
@click.option("--grace-seconds", type=click.FloatRange(min=0), default=25.0, show_default=True,
              help="How long to wait for the ranks after SIGTERM (the chart: the pod's grace period less a margin).")
def worker(sshd_config: str, sshd_bin: str, grace_seconds: float) -> None:
    """Run as a worker pod's main process: host keys, sshd, the ranks' log lines, SIGTERM to ranks.

    \b
    Example (the chart's worker command):
      pipelora-k8s worker --grace-seconds 280
    """
    entry = WorkerEntrypoint(sshd_config=sshd_config, grace_s=grace_seconds, sshd=sshd_bin)
    sys.exit(entry.run())


@click.command("pod-env")
def pod_env() -> None:
    """Print the pod variables a rank started through ssh receives (secret values masked).

    \b
    Example (debugging IRSA or NCCL settings on a worker pod):
      kubectl exec alpaca-mistral-worker-0 -- pipelora-k8s pod-env
    """
    apply_pod_env(pod_env_file(pod_runtime_dir()), os.environ)  # done at start already; idempotent
    applied = podenv.applied_names
    for name in sorted(set(recorded_names(os.environ)) | applied):
        value = "***" if SECRET_NAME.search(name) else os.environ[name]
        source = "pod" if name in applied else "own"
        click.echo(f"{name}={value}  ({source})")
