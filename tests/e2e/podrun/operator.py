"""What the Kubeflow MPI Operator v0.8.2 makes of an MPIJob (`pkg/controller/mpi_job_controller.go`).

Pure functions from the rendered MPIJob to the objects the operator creates: the hostfile
ConfigMap `<name>-config`, the ssh Secret `<name>-ssh`, the worker Pods `<name>-worker-<i>` and
the launcher Job `<name>-launcher`. Only the OpenMPI implementation, which is what the chart sets.
The kubelet side (how a Pod becomes containers) is in `kubelet`.
"""

from __future__ import annotations

import copy
from typing import Any

CONFIG_SUFFIX = "-config"
CONFIG_VOLUME = "mpi-job-config"
CONFIG_MOUNT_PATH = "/etc/mpi"
HOSTFILE = "hostfile"
DISCOVER_HOSTS = "discover_hosts.sh"
SSH_SUFFIX = "-ssh"
SSH_VOLUME = "ssh-auth"
ROOT_SSH_PATH = "/root/.ssh"
SSH_PRIVATE_KEY = "ssh-privatekey"  # corev1.SSHAuthPrivateKey
SSH_PUBLIC_KEY = "ssh-publickey"

OPERATOR_NAME_LABEL = "training.kubeflow.org/operator-name"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
JOB_ROLE_LABEL = "training.kubeflow.org/job-role"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"


class UnsupportedMPIJob(ValueError):
    """An MPIJob this emulation does not cover (another MPI implementation, runLauncherAsWorker...)."""


def _spec(mpijob: dict[str, Any]) -> dict[str, Any]:
    spec = mpijob.get("spec") or {}
    implementation = spec.get("mpiImplementation", "OpenMPI")
    if implementation != "OpenMPI":
        raise UnsupportedMPIJob(f"mpiImplementation {implementation} is not emulated (OpenMPI only)")
    if spec.get("runLauncherAsWorker"):
        raise UnsupportedMPIJob("runLauncherAsWorker is not emulated")
    return spec


def name_of(mpijob: dict[str, Any]) -> str:
    return str(mpijob["metadata"]["name"])


def slots_per_worker(mpijob: dict[str, Any]) -> int:
    return int(_spec(mpijob).get("slotsPerWorker") or 1)


def worker_replicas(mpijob: dict[str, Any]) -> int:
    worker = (_spec(mpijob).get("mpiReplicaSpecs") or {}).get("Worker") or {}
    return int(worker.get("replicas") or 0)


def worker_name(mpijob: dict[str, Any], index: int) -> str:
    return f"{name_of(mpijob)}-worker-{index}"


def worker_fqdn(mpijob: dict[str, Any], index: int, namespace: str) -> str:
    """`<name>-worker-<i>.<name>.<ns>.svc`: the hostfile's form (no cluster domain configured)."""
    name = name_of(mpijob)
    return f"{worker_name(mpijob, index)}.{name}.{namespace}.svc"


def hostfile(mpijob: dict[str, Any], namespace: str) -> str:
    """newConfigMap: one `<fqdn> slots=<slotsPerWorker>` line per worker."""
    slots = slots_per_worker(mpijob)
    return "".join(f"{worker_fqdn(mpijob, i, namespace)} slots={slots}\n" for i in range(worker_replicas(mpijob)))


def discover_hosts(mpijob: dict[str, Any], namespace: str, running_workers: list[int]) -> str:
    """updateDiscoverHostsInConfigMap: the running workers, sorted by pod name."""
    names = sorted((worker_name(mpijob, i), i) for i in running_workers)
    return "#!/bin/sh\n" + "".join(f"echo {worker_fqdn(mpijob, i, namespace)}\n" for _, i in names)


def config_map(mpijob: dict[str, Any], namespace: str, running_workers: list[int]) -> dict[str, Any]:
    name = name_of(mpijob)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name + CONFIG_SUFFIX, "namespace": namespace, "labels": {"app": name}},
        "data": {
            HOSTFILE: hostfile(mpijob, namespace),
            DISCOVER_HOSTS: discover_hosts(mpijob, namespace, running_workers),
        },
    }


def ssh_key_pair() -> tuple[str, str]:
    """newSSHAuthSecret: an ECDSA P-521 key, the private half PEM "EC PRIVATE KEY" (SEC1), the
    public half in authorized_keys form with no comment."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP521R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + "\n"


def ssh_secret(mpijob: dict[str, Any], namespace: str) -> dict[str, Any]:
    private, public = ssh_key_pair()
    name = name_of(mpijob)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/ssh-auth",
        "metadata": {"name": name + SSH_SUFFIX, "namespace": namespace, "labels": {"app": name}},
        "stringData": {SSH_PRIVATE_KEY: private, SSH_PUBLIC_KEY: public},
    }


def _default_labels(name: str, role: str) -> dict[str, str]:
    return {OPERATOR_NAME_LABEL: "mpi-operator", JOB_NAME_LABEL: name, JOB_ROLE_LABEL: role}


def _restart_policy(replica_spec: dict[str, Any]) -> str:
    policy = replica_spec.get("restartPolicy") or "Never"
    return "Never" if policy == "ExitCode" else str(policy)


def _setup_ssh(pod_spec: dict[str, Any], mpijob: dict[str, Any]) -> None:
    """setupSSHOnPod: the Secret on the first container at sshAuthMountPath; mode 0600 only for /root/.ssh."""
    mount_path = _spec(mpijob).get("sshAuthMountPath") or ROOT_SSH_PATH
    secret: dict[str, Any] = {
        "secretName": name_of(mpijob) + SSH_SUFFIX,
        "items": [
            {"key": SSH_PRIVATE_KEY, "path": "id_rsa"},
            {"key": SSH_PUBLIC_KEY, "path": "id_rsa.pub"},
            {"key": SSH_PUBLIC_KEY, "path": "authorized_keys"},
        ],
    }
    if mount_path == ROOT_SSH_PATH:
        secret["defaultMode"] = 0o600
    pod_spec.setdefault("volumes", []).append({"name": SSH_VOLUME, "secret": secret})
    pod_spec["containers"][0].setdefault("volumeMounts", []).append({"name": SSH_VOLUME, "mountPath": mount_path})


def _replica_template(mpijob: dict[str, Any], role: str) -> tuple[str, dict[str, Any], dict[str, Any],
                                                                 dict[str, str], dict[str, Any]]:
    """The job's name, the replica spec of `role` (Worker or Launcher), a copy of its template's
    metadata, its labels with the operator's defaults, and the copied pod spec."""
    name = name_of(mpijob)
    replica = _spec(mpijob)["mpiReplicaSpecs"][role]
    template = copy.deepcopy(replica["template"])
    metadata = template.get("metadata") or {}
    labels = dict(metadata.get("labels") or {})
    labels.update(_default_labels(name, role.lower()))
    return name, replica, metadata, labels, template["spec"]


def worker_pod(mpijob: dict[str, Any], index: int, namespace: str) -> dict[str, Any]:
    """newWorker."""
    name, replica, metadata, labels, pod_spec = _replica_template(mpijob, "Worker")
    labels[REPLICA_INDEX_LABEL] = str(index)
    pod_spec["hostname"] = worker_name(mpijob, index)
    pod_spec["subdomain"] = name
    search = f"{name}.{namespace}.svc.cluster.local"
    dns = pod_spec.setdefault("dnsConfig", {})
    dns["searches"] = [*(dns.get("searches") or []), search]
    pod_spec["restartPolicy"] = _restart_policy(replica)
    container = pod_spec["containers"][0]
    if not container.get("command") and not container.get("args"):
        container["command"] = ["/usr/sbin/sshd", "-De"]
    container["env"] = [*(container.get("env") or []), {"name": "K_MPI_JOB_ROLE", "value": "worker"}]
    _setup_ssh(pod_spec, mpijob)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": worker_name(mpijob, index), "namespace": namespace, "labels": labels,
                     "annotations": dict(metadata.get("annotations") or {})},
        "spec": pod_spec,
    }


def launcher_pod_template(mpijob: dict[str, Any], namespace: str) -> dict[str, Any]:
    """newLauncherPodTemplate (OpenMPI, the launcher not a worker)."""
    name, replica, metadata, labels, pod_spec = _replica_template(mpijob, "Launcher")
    pod_spec["hostname"] = name + "-launcher"
    pod_spec["subdomain"] = name
    container = pod_spec["containers"][0]
    container["env"] = [
        *(container.get("env") or []),
        {"name": "K_MPI_JOB_ROLE", "value": "launcher"},
        # ompiEnvVars
        {"name": "OMPI_MCA_orte_keep_fqdn_hostnames", "value": "true"},
        {"name": "OMPI_MCA_orte_default_hostfile", "value": f"{CONFIG_MOUNT_PATH}/{HOSTFILE}"},
        {"name": "OMPI_MCA_plm_rsh_args", "value": "-o ConnectionAttempts=10"},
        {"name": "OMPI_MCA_orte_set_default_slots", "value": str(slots_per_worker(mpijob))},
        # nvidiaDisableEnvVars: the launcher must not grab a GPU
        {"name": "NVIDIA_VISIBLE_DEVICES", "value": ""},
        {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": ""},
    ]
    _setup_ssh(pod_spec, mpijob)
    pod_spec["restartPolicy"] = _restart_policy(replica)
    pod_spec.setdefault("volumes", []).append({
        "name": CONFIG_VOLUME,
        "configMap": {
            "name": name + CONFIG_SUFFIX,
            "items": [
                {"key": HOSTFILE, "path": HOSTFILE, "mode": 0o444},
                {"key": DISCOVER_HOSTS, "path": DISCOVER_HOSTS, "mode": 0o555},
            ],
        },
    })
    container.setdefault("volumeMounts", []).append({"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_PATH})
    return {"metadata": {"labels": labels, "annotations": dict(metadata.get("annotations") or {})}, "spec": pod_spec}


def launcher_job(mpijob: dict[str, Any], namespace: str) -> dict[str, Any]:
    """newLauncherJob: the launcher's retries are the Job's (backoffLimit = runPolicy.backoffLimit)."""
    run_policy = _spec(mpijob).get("runPolicy") or {}
    name = name_of(mpijob)
    job_spec: dict[str, Any] = {"template": launcher_pod_template(mpijob, namespace), "podReplacementPolicy": "Failed"}
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if run_policy.get(key) is not None:
            job_spec[key] = run_policy[key]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name + "-launcher", "namespace": namespace, "labels": {"app": name}},
        "spec": job_spec,
    }


def run_policy(mpijob: dict[str, Any]) -> dict[str, Any]:
    return dict(_spec(mpijob).get("runPolicy") or {})


def is_suspended(mpijob: dict[str, Any]) -> bool:
    return bool(run_policy(mpijob).get("suspend"))


def launcher_creation_policy(mpijob: dict[str, Any]) -> str:
    return str(_spec(mpijob).get("launcherCreationPolicy") or "AtStartup")


def clean_pod_policy(mpijob: dict[str, Any]) -> str:
    return str(run_policy(mpijob).get("cleanPodPolicy") or "None")
