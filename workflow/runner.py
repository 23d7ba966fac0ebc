"""`pipelora-k8s run`: the chart's commands, executed on this machine.

Dataprep, the wait for its manifest, then `mpirun` over a localhost hostfile: the very argv the
cluster's pods run (`commands.job_commands`), with the additions one machine needs. Missing local
inputs (the tiny model, the generated dataset) are created first, so a fresh checkout can run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelora.config import JobSpec
from pipelora.errors import PipeloraError
from pipelora.hub import is_hub_uri
from pipelora.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST_NAME
from pipelora.lease import LeaseHeld, LeaseLost, refuse_if_held
from pipelora.storage import is_s3, local_path, storage_for
from pipelora.workflow.commands import JobCommands, job_commands, local_hostfile_text
from pipelora.workflow.plot import plot_losses
from pipelora.workflow.waitdata import wait_for_data
from pipelora.workflow.worker import children_of, is_rank

Echo = Callable[[str], None]


class RunError(PipeloraError):
    """A step of the local run failed; its own output, above, says why."""


class RunPreempted(PipeloraError):
    """Ctrl-C (or SIGTERM) stopped training at a step boundary after a committed checkpoint."""

    exit_code = 75


def _run_training(argv: list[str], *, env: dict[str, str]) -> int:
    """mpirun in its own session; Ctrl-C or SIGTERM here reaches the ranks as SIGTERM, as on a cluster.

    A terminal's Ctrl-C would otherwise hit mpirun, which kills the ranks before they can commit a
    checkpoint; the ranks instead agree to stop at the next step boundary with a checkpoint.
    """
    proc = subprocess.Popen(argv, env=env, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        for pid in children_of(proc.pid):
            if is_rank(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class RunResult:
    run_uri: str
    workdir: Path
    adapter_uri: str
    progress: dict = field(default_factory=dict)
    loss_curve: Path | None = None


def is_local(uri: str) -> bool:
    """A path on this machine (not s3://, not an hf:// repo that dataprep mirrors)."""
    return not is_s3(uri) and not is_hub_uri(uri)


def ensure_inputs(spec: JobSpec, *, env: dict[str, str], echo: Echo) -> None:
    """Create the tiny model and the generated dataset where the spec names local paths that do not exist."""
    if is_local(spec.model.uri) and not (local_path(spec.model.uri) / "config.json").exists():
        echo(f"==> no model at {spec.model.uri}: creating a tiny random-weight Mistral there")
        _run_step(["pipelora-k8s", "init-model", "--family", "mistral", "--preset", "tiny",
                   "--out", str(local_path(spec.model.uri)), "--seed", str(spec.training.seed)],
                  env=env, what="init-model")
    if is_local(spec.dataset.uri) and not local_path(spec.dataset.uri).exists():
        echo(f"==> no dataset at {spec.dataset.uri}: generating the learnable Alpaca-format dataset")
        _run_step(["pipelora-k8s", "make-dataset", "--out", str(local_path(spec.dataset.uri)),
                   "--seed", str(spec.training.seed)], env=env, what="make-dataset")


def run_environment(spec: JobSpec) -> dict[str, str]:
    """The processes' environment: this installation's bin/ first, one thread per rank, CPU DeepSpeed without GPUs."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    # Not PYTHONUNBUFFERED: unbuffered, print() writes a line and its newline separately, and
    # mpirun's --tag-output then splits (and interleaves) them. The ranks flush each line themselves.
    env.pop("PYTHONUNBUFFERED", None)
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // spec.parallel.world_size)))
    if shutil.which("nvidia-smi") is None:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _run_step(argv: list[str], *, env: dict[str, str], what: str) -> None:
    proc = subprocess.run(argv, env=env, check=False)
    if proc.returncode != 0:
        raise RunError(f"{what} failed with exit code {proc.returncode}; its output is above")


def clear_previous(spec: JobSpec, *, echo: Echo) -> None:
    """Remove a previous run's checkpoints, adapter, progress and logs (the prepared data stays)."""
    for uri in spec.layout.training_outputs:
        removed = storage_for(spec, uri).delete_prefix(uri)
        if removed:
            echo(f"==> removed {removed} object(s) of the previous run under {uri}")


def prepare_workdir(spec: JobSpec, workdir: Path) -> tuple[Path, Path]:
    """Write the resolved spec and the localhost hostfile, the local stand-ins for the ConfigMap and /etc/mpi."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "job.yaml"
    config.write_text(spec.to_yaml(), encoding="utf-8")
    hostfile = workdir / "hostfile"
    hostfile.write_text(local_hostfile_text(spec), encoding="utf-8")
    return config, hostfile


def default_workdir(spec: JobSpec) -> Path:
    if is_local(spec.run_uri):
        return local_path(spec.run_uri) / "local"
    return Path(tempfile.mkdtemp(prefix=f"pipelora-{spec.name}-"))


def free_port() -> int:
    """A free loopback port for the ranks' rendezvous, so concurrent local runs do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_commands(spec: JobSpec, *, config: Path, hostfile: Path, master_port: int | None = None) -> JobCommands:
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    return job_commands(spec, config_path=str(config), hostfile=str(hostfile), local=True, as_root=as_root,
                        data_timeout_s=60, master_port=master_port or free_port())


def run_local(spec: JobSpec, *, workdir: Path | None = None, make_missing: bool = True, fresh: bool = False,
              echo: Echo = print) -> RunResult:
    """Run the whole job here; returns where the results are."""
    # Another attempt writing this run (a second terminal, a pod on the same bucket): refuse before
    # dataprep or --fresh touch its folder; the trainer's own lease check settles any race.
    refuse_if_held(storage_for(spec, spec.run_uri), spec.layout, run=spec.name)
    env = run_environment(spec)
    workdir = workdir or default_workdir(spec)
    if make_missing:
        ensure_inputs(spec, env=env, echo=echo)
    if fresh:
        clear_previous(spec, echo=echo)
    config, hostfile = prepare_workdir(spec, workdir)
    commands = local_commands(spec, config=config, hostfile=hostfile)
    echo(f"==> dataprep: {' '.join(commands.dataprep)}")
    _run_step(commands.dataprep, env=env, what="dataprep")
    wait_for_data(spec, timeout_s=60, interval_s=1, echo=lambda m: echo(f"==> {m}"))
    echo(f"==> train: {' '.join(commands.launcher)}")
    code = _run_training(commands.launcher, env=env)
    if code != 0:
        progress = _progress(spec)
        if code == LeaseHeld.exit_code:
            refuse_if_held(storage_for(spec, spec.run_uri), spec.layout, run=spec.name)
            raise LeaseHeld(f"run '{spec.name}' was taken by another attempt as training started; its ranks "
                            "said which, above")
        if code == LeaseLost.exit_code:
            raise LeaseLost(f"training of run '{spec.name}' stopped: another attempt took over its lease, and this "
                            "one committed nothing after that; its ranks said which, above")
        if progress.get("state") == "preempted":
            raise RunPreempted(f"preempted at step {progress.get('step')}, checkpoint committed; run the same "
                               "command again (without --fresh) to resume")
        raise RunError(f"training (mpirun) failed with exit code {code}; its output is above")
    return summarize(spec, workdir=workdir, echo=echo)


def _progress(spec: JobSpec) -> dict[str, Any]:
    storage = storage_for(spec, spec.run_uri)
    uri = spec.layout.progress
    return dict(storage.read_json(uri)) if storage.exists(uri) else {}


def summarize(spec: JobSpec, *, workdir: Path, echo: Echo) -> RunResult:
    """Check the adapter landed, plot the loss curve, and print where everything is."""
    layout = spec.layout
    storage = storage_for(spec, spec.run_uri)
    if not storage.exists(layout.adapter_complete):
        raise RunError(f"training finished but no complete adapter was written at {layout.adapter}")
    progress_uri = layout.progress
    progress = storage.read_json(progress_uri) if storage.exists(progress_uri) else {}
    result = RunResult(run_uri=spec.run_uri, workdir=workdir, adapter_uri=layout.adapter_weights, progress=progress)
    if progress.get("losses") or progress.get("eval_losses"):
        out = (local_path(spec.run_uri) if is_local(spec.run_uri) else workdir) / "loss_curve.png"
        result.loss_curve = plot_losses(progress, out, title=f"{spec.name}: {spec.parallel.stages} stages")
    checkpoints = storage.list_dirs(layout.checkpoints)
    evals = progress.get("eval_losses") or []
    echo("")
    echo(f"run folder    {spec.run_uri}")
    echo(f"data          {layout.data} ({MANIFEST_NAME})")
    echo(f"checkpoints   {layout.checkpoints} ({', '.join(checkpoints) or 'none'})")
    echo(f"adapter       {layout.adapter} (PEFT: {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})")
    echo(f"logs          {layout.logs} (every rank's lines)")
    if result.loss_curve:
        echo(f"loss curve    {result.loss_curve}")
    if evals:
        echo(f"eval loss     {evals[0][1]:.4f} at step {evals[0][0]} -> {evals[-1][1]:.4f} at step {evals[-1][0]}")
    echo(f"job spec      {workdir / 'job.yaml'} (hostfile beside it)")
    return result
