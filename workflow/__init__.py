"""pipelora.workflow: the CLI, the Helm chart's values, the cluster clients and the local runner.

Nothing imports this package except the CLI entry point; it reaches dataprep and the trainer only
through the commands it runs (`pipelora-k8s dataprep`, `pipelora-k8s train`).
"""

# The package's modules, each with one job (imported on use: `pipelora-k8s status` stays light).
__all__ = [
    "cli",  # the `pipelora-k8s` entry point (lazy commands)
    "commands",  # the command lines every run executes, built in one place
    "values",  # job spec -> chart values
    "names",  # the release's object names
    "helm",  # helm template / upgrade --install / uninstall
    "rules",  # the MPI Operator's controller rules, checked before submitting
    "kube",  # the few Kubernetes API reads and patches the commands need
    "cluster_cli",  # submit, render, status, logs, delete, list, wait-for-data, release-training
    "status",  # Job/MPIJob conditions and the run's progress
    "logs",  # pods' logs, or the run's durable logs once the pods are gone
    "gate",  # resume the suspended MPIJob once the data is committed
    "waitdata",  # wait for the data manifest (or a failed dataprep Job)
    "worker",  # a worker pod's PID 1: host keys, sshd, rank line relay, SIGTERM to ranks
    "worker_cli",  # `worker` and `pod-env`
    "runner",  # the whole job on this machine
    "runner_cli",  # `run`
    "plot",  # the loss curve PNG
]
