"""Cluster commands: submit, render, status, logs, delete, list; and the two steps that run in the
release's own pods: the launcher's wait-for-data, and release-training in the dataprep Job.

They share kubectl's `--context` / `--namespace`; nothing here touches a cluster before the
spec and the MPI Operator's own rules have been checked on the rendered release.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from pipelora.cli_common import spec_options
from pipelora.config import JobSpec
from pipelora.workflow import helm
from pipelora.workflow.helm import KubeTarget
from pipelora.workflow.rules import check_release, parse_manifests
from pipelora.workflow.values import chart_values

F = TypeVar("F", bound=Callable[..., Any])


def kube_options(func: F) -> F:
    """kubectl's --context and --namespace; the command receives `target: KubeTarget`."""

    @click.option("--context", "kube_context", help="kubeconfig context (default: the current one).")
    @click.option("--namespace", "-n", help="Namespace (default: the context's, else 'default').")
    @functools.wraps(func)
    def wrapper(*args: Any, kube_context: str | None, namespace: str | None, **kwargs: Any) -> Any:
        kwargs["target"] = KubeTarget(context=kube_context, namespace=namespace)
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _render(spec: JobSpec, namespace: str | None) -> tuple[dict[str, Any], str]:
    values = chart_values(spec)
    text = helm.template(spec.name, values, namespace=namespace)
    check_release(text)
    return values, text


@click.command()
@spec_options
@kube_options
@click.option("--dry-run", is_flag=True, help="Validate and print the manifests; install nothing.")
@click.option("--wait", "wait_done", is_flag=True, help="After installing, follow the launcher's log to the end.")
@click.option("--gpu-memory-gib", type=click.FloatRange(min=1), envvar="PIPELORA_GPU_MEMORY_GIB", default=None,
              help="Memory of one GPU: refuse a job whose pipeline stages would not fit (as `plan` predicts).")
def submit(spec: JobSpec, target: KubeTarget, dry_run: bool, wait_done: bool, gpu_memory_gib: float | None) -> None:
    """Validate a job and install it as a Helm release (dataprep Job + MPIJob).

    \b
    Example:
      pipelora-k8s submit --config job.yaml --stages 8 --nodes 2
      pipelora-k8s submit --config job.yaml --dry-run > release.yaml
    """
    target = KubeTarget(context=target.context, namespace=target.namespace or spec.cluster.namespace)
    from pipelora.workflow.cli import check_fits

    check_fits(spec, gpu_memory_gib)  # before anything is installed: the stages must fit the GPUs
    values, text = _render(spec, target.namespace)
    if dry_run:
        click.echo(text, nl=False)
        return
    notes = helm.upgrade_install(spec.name, values, target=target)
    click.echo(notes, nl=False)
    if wait_done:
        _wait_for_job(spec.name, target)


def _wait_for_job(name: str, target: KubeTarget, *, poll_s: float = 10.0) -> None:
    """Follow the launcher's log while it runs, then report the MPIJob's final phase."""
    from pipelora.workflow.kube import Kube, KubeError
    from pipelora.workflow.logs import log_lines, newest_pod
    from pipelora.workflow.names import ReleaseNames
    from pipelora.workflow.status import (
        DataprepFailed,
        dataprep_problem,
        is_suspended,
        job_phase,
        release_spec,
    )

    kube = Kube.connect(target)
    spec = release_spec(kube, name)
    names = ReleaseNames(name)
    streamed = False
    while True:
        mpijob = kube.mpijob(names.mpijob)
        phase = job_phase(mpijob)
        if phase in ("Succeeded", "Failed"):
            break
        if mpijob is None or is_suspended(mpijob):
            problem = dataprep_problem(kube.job(names.dataprep_job), mpijob, kube.pods(names.selector("dataprep")))
            if problem:
                raise DataprepFailed(problem)
        if phase == "Running" and newest_pod(kube, name, "launcher"):
            try:
                for line in log_lines(kube, spec, component="launcher", follow=True):
                    click.echo(line)
                    streamed = True
            except KubeError:
                pass  # the launcher is still in its init container: poll again
        time.sleep(poll_s)
    if not streamed and newest_pod(kube, name, "launcher"):
        for line in log_lines(kube, spec, component="launcher", tail=200):
            click.echo(line)
    click.echo(f"MPIJob {name}: {phase}")
    if phase == "Failed":
        raise KubeError(f"job {name} failed; see `pipelora-k8s status {name}` and `pipelora-k8s logs {name}`")


@click.command()
@spec_options
@click.option("--namespace", "-n", help="Namespace written into the manifests.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write one file per object into this folder instead of stdout.")
@click.option("--values-only", is_flag=True, help="Print the chart values instead of the manifests.")
def render(spec: JobSpec, namespace: str | None, out_dir: str | None, values_only: bool) -> None:
    """Render the release's manifests (helm template) without a cluster.

    \b
    Example:
      pipelora-k8s render --config job.yaml --stages 8 --nodes 2 > release.yaml
      pipelora-k8s render --config job.yaml --out manifests/
    """
    values, text = _render(spec, namespace or spec.cluster.namespace)
    if values_only:
        click.echo(yaml.safe_dump(values, sort_keys=False), nl=False)
        return
    if out_dir is None:
        click.echo(text, nl=False)
        return
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for obj in parse_manifests(text):
        path = folder / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")
        click.echo(str(path))


@click.command()
@click.argument("name")
@kube_options
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True)
def status(name: str, target: KubeTarget, output: str) -> None:
    """The dataprep Job's and MPIJob's conditions, the pods, and the training progress.

    Exits non-zero when dataprep failed (the MPIJob then stays suspended, holding no GPU).

    \b
    Example:
      pipelora-k8s status alpaca-mistral --namespace ml
    """
    from pipelora.workflow.kube import Kube
    from pipelora.workflow.status import DataprepFailed, collect_status, format_status

    info = collect_status(Kube.connect(target), name)
    click.echo(json.dumps(info, indent=2) if output == "json" else format_status(info))
    if info.get("problem"):
        raise DataprepFailed(info["problem"])


@click.command()
@click.argument("name")
@kube_options
@click.option("--stage", type=int, help="Only this pipeline stage (1-based): its worker pods, or its ranks' stored logs.")
@click.option("--component", type=click.Choice(["launcher", "worker", "dataprep"]),
              help="Which pods (default: the launcher, or dataprep before it exists).")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming new lines (from storage: until the run ends).")
@click.option("--tail", type=int, help="Only the last N lines of each pod (from storage: of the merged log).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="The job spec: finds the stored logs when the release itself is gone.")
def logs(name: str, target: KubeTarget, stage: int | None, component: str | None, follow: bool,
         tail: int | None, config_path: str | None) -> None:
    """Show a job's log: every rank's lines (launcher), or one stage's.

    Read from the pods while they exist; once they are gone (the job ended, or the release was
    deleted), from the lines every rank keeps in the run's storage folder. stderr says which.

    \b
    Example:
      pipelora-k8s logs alpaca-mistral --follow
      pipelora-k8s logs alpaca-mistral --stage 3
      pipelora-k8s logs alpaca-mistral --config job.yaml   # after `pipelora-k8s delete`
    """
    from pipelora.workflow.logs import job_logs, run_over

    kube, spec, why = _logs_source(name, target, config_path)
    view = job_logs(kube, spec, stage=stage, component=component, follow=follow, tail=tail, why=why,
                    finished=run_over(kube, spec))
    click.echo(view.source, err=True)
    for line in view.lines:
        click.echo(line)
        sys.stdout.flush()


def _logs_source(name: str, target: KubeTarget, config_path: str | None) -> tuple[Any, JobSpec, str]:
    """(the API or None, the job spec, why storage would be read): the release's ConfigMap first, then --config."""
    from pipelora.config import load_spec
    from pipelora.workflow.kube import Kube, KubeError, KubeUnreachable
    from pipelora.workflow.status import find_release_spec

    def from_file() -> JobSpec:
        assert config_path is not None
        spec = load_spec(config_path)
        if spec.name != name:
            raise click.UsageError(f"--config {config_path} is job '{spec.name}', not '{name}'")
        return spec

    try:
        kube = Kube.connect(target)
        spec = find_release_spec(kube, name)
    except KubeError as exc:
        if config_path is None:
            raise
        why = "the cluster cannot be reached" if isinstance(exc, KubeUnreachable) else str(exc).split(";")[0]
        return None, from_file(), why
    if spec is not None:
        return kube, spec, "the pods are gone"
    if config_path is None:
        raise KubeError(f"no pipelora job named {name} in namespace {kube.namespace} (see `pipelora-k8s list`, "
                        "or pass --namespace); for a release already deleted, pass --config job.yaml to read "
                        "its logs from storage")
    return None, from_file(), f"the release {name} is gone from namespace {kube.namespace}"


@click.command()
@click.argument("name")
@kube_options
def delete(name: str, target: KubeTarget) -> None:
    """Uninstall a job's release (its pods go; the run folder in storage stays).

    \b
    Example:
      pipelora-k8s delete alpaca-mistral
    """
    click.echo(helm.uninstall(name, target=target), nl=False)


@click.command(name="list")
@kube_options
@click.option("--all-namespaces", "-A", is_flag=True, help="Every namespace.")
def list_jobs(target: KubeTarget, all_namespaces: bool) -> None:
    """List pipelora releases.

    \b
    Example:
      pipelora-k8s list -A
    """
    releases = helm.list_releases(target=target, all_namespaces=all_namespaces)
    if not releases:
        click.echo("no pipelora jobs")
        return
    click.echo(f"{'NAME':<40} {'NAMESPACE':<16} {'STATUS':<10} {'REVISION':<8} UPDATED")
    for r in releases:
        click.echo(f"{r.get('name', ''):<40} {r.get('namespace', ''):<16} {r.get('status', ''):<10} "
                   f"{r.get('revision', ''):<8} {r.get('updated', '')}")


@click.command(name="wait-for-data")
@spec_options
@click.option("--timeout", "timeout_s", type=float, default=86400, show_default=True,
              help="Seconds to wait before failing.")
@click.option("--interval", "interval_s", type=float, default=10, show_default=True, help="Seconds between polls.")
@click.option("--workers/--no-workers", "wait_workers", default=False, show_default=True,
              help="Then also wait until every worker pod's sshd accepts connections (the launcher does).")
def wait_for_data_cmd(spec: JobSpec, timeout_s: float, interval_s: float, wait_workers: bool) -> None:
    """Wait until the run's data manifest is committed (the MPIJob launcher runs this first).

    Inside a pod whose service account may read the dataprep Job, a failed Job ends the wait
    at once, with its reason; elsewhere only storage is polled. With --workers it then waits for
    every worker's sshd, so mpirun never starts before its hosts resolve.

    \b
    Example:
      pipelora-k8s wait-for-data --config job.yaml --timeout 3600
    """
    from pipelora.workflow.kube import Kube, KubeError
    from pipelora.workflow.waitdata import wait_for_data

    try:
        kube = Kube.in_cluster()
    except KubeError:
        kube = None
    began = time.monotonic()
    wait_for_data(spec, timeout_s=timeout_s, interval_s=interval_s, echo=click.echo, kube=kube)
    if wait_workers:
        from pipelora.launch import SSH_PORT
        from pipelora.workflow.names import ReleaseNames
        from pipelora.workflow.waitdata import wait_for_workers

        names = ReleaseNames(spec.name)
        wait_for_workers([names.worker_host(i) for i in range(spec.parallel.nodes)], port=SSH_PORT,
                         timeout_s=max(timeout_s - (time.monotonic() - began), 1.0), echo=click.echo)


@click.command(name="release-training")
@spec_options
@kube_options
def release_training(spec: JobSpec, target: KubeTarget) -> None:
    """Resume the job's suspended MPIJob once its data manifest is committed (the dataprep Job's last step).

    Run in the dataprep Job's pod with its service account (namespace from the pod); it fails,
    leaving the MPIJob suspended, when the manifest is missing.

    \b
    Example:
      pipelora-k8s release-training --config /etc/pipelora/job.yaml
    """
    from pipelora.workflow.gate import release_training as release
    from pipelora.workflow.kube import Kube

    release(spec, Kube.connect(target), echo=click.echo)
