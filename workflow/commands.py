"""The command lines every run executes, built in one place.

The chart's dataprep Job and MPIJob launcher, and `pipelora-k8s run` on one machine, all take
their argv from here, so a job that works locally runs the very same commands on a cluster.
The only differences are the ones a single machine needs (a localhost hostfile, running as
root, more ranks than cores), added by `local=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelora.config import JobSpec
from pipelora.launch import (
    CLUSTER_HOSTFILE,
    MASTER_PORT,
    POD_RUNTIME_DIR,
    RELAY_DIR_ENV,
    rank_relay_dir,
    ready_file,
)
from pipelora.workflow.names import ReleaseNames

# Where the chart mounts the resolved spec (ConfigMap).
CLUSTER_CONFIG_PATH = "/etc/pipelora/job.yaml"
DEFAULT_DATA_TIMEOUT_S = 24 * 3600

S3_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
HF_SECRET_ENV = ("HF_TOKEN",)


@dataclass(frozen=True)
class JobCommands:
    """The argv lists of one run: dataprep, the launcher's wait for data and mpirun, and the worker pods'
    entrypoint and readiness check, and the dataprep Job's release of the suspended MPIJob."""

    dataprep: list[str]
    wait_for_data: list[str]
    launcher: list[str]
    worker: list[str]
    worker_ready: list[str]
    release_training: list[str]


def master_addr(spec: JobSpec) -> str:
    """Rank 0 runs on worker 0; its name resolves through the MPIJob's headless Service."""
    return ReleaseNames(spec.name).worker_host(0)


def forwarded_env(spec: JobSpec) -> list[str]:
    """Names of variables the launcher passes on to every rank (ssh drops the pod environment).

    Only names are passed (`-x NAME`), so secret values never appear on a command line.
    """
    names: list[str] = ["PATH"]
    if spec.cluster.s3_secret:
        names += S3_SECRET_ENV
    if spec.cluster.hf_token_secret:
        names += HF_SECRET_ENV
    for item in spec.cluster.values.get("env", []) or []:
        name = item.get("name") if isinstance(item, dict) else None
        if name and name not in names:
            names.append(name)
    return names


def mpirun_command(
    spec: JobSpec,
    *,
    config_path: str,
    hostfile: str,
    local: bool = False,
    as_root: bool = False,
    env_names: list[str] | None = None,
    master_port: int = MASTER_PORT,
) -> list[str]:
    """`mpirun … pipelora-k8s train`: one rank per GPU slot, output tagged by rank."""
    argv = ["mpirun", "--hostfile", hostfile, "-np", str(spec.parallel.world_size)]
    if local:
        if as_root:
            argv.append("--allow-run-as-root")
        argv.append("--oversubscribe")
    argv += ["--bind-to", "none", "--map-by", "slot", "--tag-output"]
    if local:
        argv += ["-x", f"PIPELORA_HOSTFILE={hostfile}", "-x", "MASTER_ADDR=127.0.0.1"]
    else:
        # Each rank appends its lines in its worker pod's runtime folder; the pod's entrypoint relays them.
        relay = rank_relay_dir(Path(POD_RUNTIME_DIR))
        argv += ["-x", f"{RELAY_DIR_ENV}={relay}", "-x", f"MASTER_ADDR={master_addr(spec)}"]
    argv += ["-x", f"MASTER_PORT={master_port}"]
    for name in forwarded_env(spec) if env_names is None else env_names:
        argv += ["-x", name]
    return [*argv, *train_command(config_path=config_path)]


def train_command(*, config_path: str) -> list[str]:
    return ["pipelora-k8s", "train", "--config", config_path]


def dataprep_command(*, config_path: str) -> list[str]:
    return ["pipelora-k8s", "dataprep", "--config", config_path]


def worker_command() -> list[str]:
    """PID 1 of a worker pod (the chart appends `--grace-seconds` from its termination grace period)."""
    return ["pipelora-k8s", "worker"]


def worker_ready_command() -> list[str]:
    """The worker's readiness probe: the entrypoint's ready file, present once sshd listens."""
    return ["test", "-e", str(ready_file(Path(POD_RUNTIME_DIR)))]


def release_training_command(*, config_path: str) -> list[str]:
    return ["pipelora-k8s", "release-training", "--config", config_path]


def wait_for_data_command(*, config_path: str, timeout_s: int = DEFAULT_DATA_TIMEOUT_S,
                          workers: bool = False) -> list[str]:
    """The launcher's first step: the data manifest, then (on a cluster) every worker's sshd."""
    argv = ["pipelora-k8s", "wait-for-data", "--config", config_path, "--timeout", str(timeout_s)]
    return [*argv, "--workers"] if workers else argv


def job_commands(
    spec: JobSpec,
    *,
    config_path: str = CLUSTER_CONFIG_PATH,
    hostfile: str = CLUSTER_HOSTFILE,
    local: bool = False,
    as_root: bool = False,
    data_timeout_s: int = DEFAULT_DATA_TIMEOUT_S,
    master_port: int = MASTER_PORT,
) -> JobCommands:
    """Every command of a run; the defaults are the cluster's paths."""
    return JobCommands(
        dataprep=dataprep_command(config_path=config_path),
        wait_for_data=wait_for_data_command(config_path=config_path, timeout_s=data_timeout_s, workers=not local),
        launcher=mpirun_command(
            spec,
            config_path=config_path,
            hostfile=hostfile,
            local=local,
            as_root=as_root,
            env_names=[] if local else None,
            master_port=master_port,
        ),
        worker=worker_command(),
        worker_ready=worker_ready_command(),
        release_training=release_training_command(config_path=config_path),
    )


def local_hostfile_text(spec: JobSpec) -> str:
    """One machine standing in for the workers: localhost with one slot per GPU of a node.

    With several nodes the ranks exceed the slots, which `--oversubscribe` allows.
    """
    return f"localhost slots={spec.parallel.gpus_per_node}\n"
