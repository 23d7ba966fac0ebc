"""A one-node, one-namespace cluster made of podman: the objects of a rendered release, and the
controllers that turn them into pods.

- the Job controller (batch/v1): a pod per attempt, `backoffLimit`, the doubling back-off between
  attempts, `activeDeadlineSeconds`, `suspend`;
- the MPI Operator v0.8.2 (`operator`): hostfile ConfigMap, ssh Secret, headless Service, worker
  pods, the launcher Job per `launcherCreationPolicy`, `runPolicy.suspend` in both directions,
  the MPIJob's conditions, `cleanPodPolicy` once it has finished;
- endpoints: a pod's DNS name (`<hostname>.<subdomain>.<ns>.svc.cluster.local`) is published on
  the podman network when it first becomes Ready, as a headless Service publishes ready pods;
- admission: the service-account token volume in every pod (when an API server runs), and the
  webhooks a test adds (e.g. `IrsaWebhook`, the EKS pod identity webhook);
- the kubelet (`kubelet`), and the API server (`apiserver`) the pods' own calls reach.

`Cluster.run` drives them all until the release has nothing left to do (the MPIJob finished, or
it is suspended and no Job is active) and returns what happened, event by event.
"""

from __future__ import annotations

import copy
import datetime
import json
import random
import string
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import operator
from .apiserver import ApiServer
from .engine import DnsRecords, EngineError, Podman
from .kubelet import RUN_LABEL, Kubelet, PodRunner, decode_config_map, decode_secret, pod_dns_name

SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
JOB_BACKOFF_CAP_S = 360.0


class ClusterError(RuntimeError):
    """The run did not reach an end in time, or the release cannot be run here."""


class Webhook(Protocol):
    """A mutating admission webhook: changes a pod before it is created."""

    def __call__(self, pod: dict[str, Any], cluster: Cluster) -> None: ...


@dataclass
class IrsaWebhook:
    """The EKS pod identity webhook: pods whose service account carries the role annotation get the
    web-identity variables and a projected token, in every container. `sts_endpoint` stands in for
    AWS STS (moto answers AssumeRoleWithWebIdentity), through the SDKs' AWS_ENDPOINT_URL_STS."""

    sts_endpoint: str
    region: str = "us-east-1"
    annotation: str = "eks.amazonaws.com/role-arn"
    mount_path: str = "/var/run/secrets/eks.amazonaws.com/serviceaccount"
    token: str = field(default_factory=lambda: "eyJhbGciOiJSUzI1NiJ9." + uuid.uuid4().hex + ".c2ln")

    def __call__(self, pod: dict[str, Any], cluster: Cluster) -> None:
        sa_name = pod["spec"].get("serviceAccountName") or "default"
        sa = cluster.get("ServiceAccount", sa_name) or {}
        role = ((sa.get("metadata") or {}).get("annotations") or {}).get(self.annotation)
        if not role:
            return
        cluster.irsa_tokens[sa_name] = self.token
        pod["spec"].setdefault("volumes", []).append({
            "name": "aws-iam-token",
            "projected": {"defaultMode": 0o644, "sources": [{"serviceAccountToken": {
                "audience": "sts.amazonaws.com", "expirationSeconds": 86400, "path": "token"}}]},
        })
        env = [
            {"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional"},
            {"name": "AWS_DEFAULT_REGION", "value": self.region},
            {"name": "AWS_REGION", "value": self.region},
            {"name": "AWS_ROLE_ARN", "value": role},
            {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": f"{self.mount_path}/token"},
            {"name": "AWS_ENDPOINT_URL_STS", "value": self.sts_endpoint},
        ]
        for container in [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]:
            names = {e["name"] for e in container.get("env") or []}
            container["env"] = [*(container.get("env") or []), *[e for e in env if e["name"] not in names]]
            container.setdefault("volumeMounts", []).append(
                {"name": "aws-iam-token", "mountPath": self.mount_path, "readOnly": True})


@dataclass
class JobState:
    """The Job controller's memory of one Job."""

    name: str
    pods: list[str] = field(default_factory=list)
    counted: set[str] = field(default_factory=set)
    failed: int = 0
    succeeded: int = 0
    next_at: float = 0.0
    started_at: float | None = None
    condition: tuple[str, str, str] | None = None  # (type, reason, message): Complete or Failed


@dataclass
class MPIJobState:
    name: str
    finished: str | None = None  # Succeeded or Failed
    message: str = ""
    cleaned: bool = False
    ever_unsuspended: bool = False


@dataclass
class Network:
    """A podman network for one cluster, with a long-lived container on it so its bridge (and so its
    gateway address, where host-side servers listen) exists from the start."""

    podman: Podman
    name: str
    gateway: str
    holder: str

    @classmethod
    def create(cls, podman: Podman, *, image: str, prefix: str = "podrun") -> Network:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        podman("network", "create", "--label", f"{RUN_LABEL}={name}", name)
        holder = f"{name}-gateway"
        try:
            podman("run", "-d", "--name", holder, "--network", name, "--pull", "never",
                   "--label", f"{RUN_LABEL}={name}", "--entrypoint", '["sleep","infinity"]', image)
            gateway = podman.network_gateway(name)
        except EngineError:
            podman("rm", "-f", "-t", "0", holder, check=False)
            podman("network", "rm", "-f", name, check=False)
            raise
        return cls(podman, name, gateway, holder)

    def remove(self) -> None:
        self.podman("rm", "-f", "-t", "0", self.holder, check=False)
        self.podman("network", "rm", "-f", self.name, check=False, timeout=180)
        if self.podman("network", "exists", self.name, check=False).returncode != 0:
            DnsRecords(self.name).forget()


def _rand5() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=5))


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """What a run came to."""

    mpijob_phase: str  # Succeeded, Failed, Suspended, Running...
    mpijob_message: str
    jobs: dict[str, tuple[str, str, str] | None]  # Job name → (type, reason, message) or None
    events: list[str]

    def timeline(self) -> str:
        return "\n".join(self.events)


class Cluster:
    """One namespace on one podman network. See the module docstring."""

    def __init__(self, *, podman: Podman, network: Network, image: str, workdir: Path,
                 namespace: str = "default", backoff_base_s: float = 10.0, api_server: bool = True,
                 webhooks: list[Webhook] | None = None, tick_s: float = 0.5) -> None:
        self.podman = podman
        self.network = network
        self.namespace = namespace
        self.workdir = workdir
        self.run_id = f"pr{uuid.uuid4().hex[:6]}"
        self.webhooks = list(webhooks or [])
        self.tick_s = tick_s
        self.backoff_base_s = backoff_base_s
        self.started = time.monotonic()
        self.events: list[str] = []
        self.irsa_tokens: dict[str, str] = {}
        self._lock = threading.RLock()
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, PodRunner] = {}  # the current pod of each name
        self.history: list[PodRunner] = []  # every pod ever created, oldest first
        self.jobs: dict[str, JobState] = {}
        self.mpijobs: dict[str, MPIJobState] = {}
        self.published: dict[str, tuple[str, str]] = {}
        # Pod addresses by pod uid, not name: a worker the operator creates again under the same name
        # is a new pod with a new address, and its DNS record must follow it (a Service's endpoints do).
        self._ips: dict[str, str] = {}
        self.dns = DnsRecords(network.name)
        self.api: ApiServer | None = None
        if api_server:
            self.api = ApiServer(host=network.gateway, namespace=namespace, objects=self.objects,
                                 patch=self._api_patch, pod_log=self._api_pod_log, workdir=workdir / "apiserver")
            self.put({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt"},
                      "data": {"ca.crt": self.api.certs.ca_pem.decode()}})
        self.kubelet = Kubelet(podman=podman, network=network.name, run_id=self.run_id, workdir=workdir,
                               namespace=namespace, objects=self, infra_image=image,
                               service_env=self.api.service_env if self.api else dict,
                               backoff_base_s=backoff_base_s, event=self.event)

    # -- the object store ----------------------------------------------------------------------
    def event(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:7.1f}s {text}")

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", self.namespace)
        meta.setdefault("creationTimestamp", _now_iso())
        meta.setdefault("uid", str(uuid.uuid4()))
        with self._lock:
            self._objects[(obj["kind"], meta["name"])] = obj
        return obj

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._objects.get((kind, name))
            return copy.deepcopy(found) if found is not None else None

    def objects(self) -> list[dict[str, Any]]:
        with self._lock:
            self._refresh_pod_objects()
            return copy.deepcopy(list(self._objects.values()))

    def apply(self, manifests: list[dict[str, Any]]) -> None:
        """Create the release's objects (what `helm install` sends)."""
        for obj in manifests:
            ns = (obj.get("metadata") or {}).get("namespace")
            if ns not in (None, self.namespace):
                raise ClusterError(f"{obj['kind']} {obj['metadata']['name']} is for namespace {ns}, "
                                   f"this cluster serves {self.namespace}")
            if obj["kind"] == "MPIJob":
                self.mpijobs[obj["metadata"]["name"]] = MPIJobState(obj["metadata"]["name"])
            if obj["kind"] == "Job":
                self.jobs[obj["metadata"]["name"]] = JobState(obj["metadata"]["name"])
            self.put(obj)
            self.event(f"{obj['kind']} {obj['metadata']['name']} created")

    def create_secret(self, name: str, string_data: dict[str, str]) -> None:
        self.put({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": name},
                  "stringData": dict(string_data)})

    # ObjectSource, for the kubelet
    def secret_data(self, name: str) -> dict[str, bytes] | None:
        found = self.get("Secret", name)
        return None if found is None else decode_secret(found)

    def config_map_data(self, name: str) -> dict[str, bytes] | None:
        found = self.get("ConfigMap", name)
        return None if found is None else decode_config_map(found)

    def service_account_token(self, service_account: str, audience: str | None) -> str:
        if audience == "sts.amazonaws.com" and service_account in self.irsa_tokens:
            return self.irsa_tokens[service_account]
        if self.api is None:
            return "no-api-server"
        return self.api.token_for(service_account)

    # -- the API server's side -----------------------------------------------------------------
    def _api_patch(self, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        from .apiserver import merge_patch

        with self._lock:
            current = self._objects.get((kind, name))
            if current is None:
                return None
            updated = merge_patch(current, patch)
            self._objects[(kind, name)] = updated
        self.event(f"API: {kind} {name} patched with {json.dumps(patch, sort_keys=True)}")
        return copy.deepcopy(updated)

    def _api_pod_log(self, pod: str, container: str | None) -> str | None:
        runner = self.pods.get(pod)
        if runner is None:
            return None
        return runner.log(container or runner.main[0].name)

    def _refresh_pod_objects(self) -> None:
        """Pods as the API shows them: phase, and each container's state and last state."""
        for name, runner in list(self.pods.items()):
            if runner.deleted:
                self._objects.pop(("Pod", name), None)
                continue

            def state(status: Any) -> dict[str, Any]:
                if status.state == "terminated":
                    return {"terminated": {"exitCode": status.exit_code, "message": status.message,
                                           "reason": "Completed" if status.exit_code == 0 else "Error"}}
                return {"running": {}} if status.state == "running" else {"waiting": {}}

            def container_status(status: Any) -> dict[str, Any]:
                out = {"name": status.name, "ready": status.ready, "restartCount": status.restart_count,
                       "state": state(status)}
                if status.last is not None:
                    out["lastState"] = {"terminated": {"exitCode": status.last[0], "message": status.last[1],
                                                       "reason": "Error" if status.last[0] else "Completed"}}
                return out

            obj = copy.deepcopy(runner.pod)
            obj["metadata"].setdefault("creationTimestamp", _now_iso())
            obj["status"] = {
                "phase": runner.phase,
                "conditions": [{"type": "Ready", "status": "True" if runner.ready else "False"}],
                "initContainerStatuses": [container_status(s) for s in runner.init],
                "containerStatuses": [container_status(s) for s in runner.main],
            }
            if runner.reason and runner.reason not in ("Error", "Init:Error"):  # the kubelet's own refusals
                obj["status"]["reason"], obj["status"]["message"] = runner.reason, runner.message
            self._objects[("Pod", name)] = obj

    # -- pods ----------------------------------------------------------------------------------
    def admit(self, pod: dict[str, Any]) -> dict[str, Any]:
        """Admission: defaults, the service-account token volume, then the webhooks."""
        pod = copy.deepcopy(pod)
        spec = pod["spec"]
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("restartPolicy", "Always")
        sa = self.get("ServiceAccount", spec["serviceAccountName"]) or {}
        automount = spec.get("automountServiceAccountToken", sa.get("automountServiceAccountToken", True))
        if self.api is not None and automount is not False:
            volume = f"kube-api-access-{_rand5()}"
            spec.setdefault("volumes", []).append({"name": volume, "projected": {"defaultMode": 0o644, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ]}})
            for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
                container.setdefault("volumeMounts", []).append(
                    {"name": volume, "mountPath": SA_TOKEN_DIR, "readOnly": True})
        for webhook in self.webhooks:
            webhook(pod, self)
        return pod

    def create_pod(self, pod: dict[str, Any]) -> PodRunner:
        name = pod["metadata"]["name"]
        if name in self.pods and not self.pods[name].deleted:
            raise ClusterError(f"pod {name} already exists")
        pod = self.admit(pod)
        pod["metadata"]["creationTimestamp"] = _now_iso()
        pod["metadata"]["uid"] = str(uuid.uuid4())
        pod["metadata"].setdefault("namespace", self.namespace)
        runner = PodRunner(self.kubelet, pod)
        self.pods[name] = runner
        self.history.append(runner)
        runner.start()
        return runner

    def pod(self, name: str) -> PodRunner:
        return self.pods[name]

    def pods_of(self, job: str) -> list[PodRunner]:
        """The pods a Job made, oldest first (its attempts)."""
        state = self.jobs.get(job)
        return [self.pods[p] for p in (state.pods if state else [])]

    def pods_named(self, name: str) -> list[PodRunner]:
        """Every pod that had this name, oldest first (a deleted worker is created again by the operator)."""
        return [p for p in self.history if p.name == name]

    def delete_pod(self, name: str, *, grace_s: int | None = None, wait: bool = False) -> None:
        """`kubectl delete pod` (an eviction, a preemption): graceful, in the background by default."""
        runner = self.pods.get(name)
        if runner is not None and not runner.terminating:
            runner.delete(grace_s=grace_s, wait=wait)

    def labels_match(self, selector: dict[str, str], pod: PodRunner) -> bool:
        labels = pod.pod["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in selector.items())

    # -- controllers ---------------------------------------------------------------------------
    def _job_pod(self, job: dict[str, Any]) -> dict[str, Any]:
        name = job["metadata"]["name"]
        template = copy.deepcopy(job["spec"]["template"])
        meta = template.get("metadata") or {}
        labels = dict(meta.get("labels") or {})
        labels.update({"batch.kubernetes.io/job-name": name, "job-name": name,
                       "batch.kubernetes.io/controller-uid": job["metadata"]["uid"],
                       "controller-uid": job["metadata"]["uid"]})
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{name}-{_rand5()}", "labels": labels,
                             "annotations": dict(meta.get("annotations") or {})},
                "spec": template["spec"]}

    def _sync_job(self, state: JobState, now: float) -> None:
        job = self.get("Job", state.name)
        if job is None or state.condition is not None:
            return
        spec = job["spec"]
        active = [self.pods[p] for p in state.pods if not self.pods[p].finished and not self.pods[p].deleted]
        if spec.get("suspend"):
            for pod in active:
                if not pod.terminating:
                    self.event(f"Job {state.name} suspended: deleting pod {pod.name}")
                    pod.delete(wait=False)
            self._write_job_status(state, job, active=0)
            return
        if state.started_at is None:
            state.started_at = now
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None and now - state.started_at > float(deadline):
            for pod in active:
                pod.delete(wait=False)
            self._finish_job(state, job, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
            return
        for name in list(state.pods):
            pod = self.pods[name]
            if name in state.counted or not (pod.finished or pod.deleted):
                continue
            state.counted.add(name)  # a pod deleted before it ended counts as a failure, as in Kubernetes
            if pod.phase == "Succeeded":
                state.succeeded += 1
            else:
                state.failed += 1
                state.next_at = now + min(JOB_BACKOFF_CAP_S, self.backoff_base_s * 2 ** (state.failed - 1))
        if state.succeeded >= int(spec.get("completions", 1) or 1):
            self._finish_job(state, job, "Complete", "", "")
            return
        backoff_limit = int(spec.get("backoffLimit", 6))
        if state.failed > backoff_limit:
            for pod in active:
                pod.delete(wait=False)
            self._finish_job(state, job, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            return
        active = [self.pods[p] for p in state.pods if not self.pods[p].finished and not self.pods[p].deleted]
        if not active and now >= state.next_at:
            pod = self._job_pod(job)
            state.pods.append(pod["metadata"]["name"])
            self.event(f"Job {state.name}: pod {pod['metadata']['name']} created (attempt {len(state.pods)})")
            self.create_pod(pod)
        active = [self.pods[p] for p in state.pods if not self.pods[p].finished and not self.pods[p].deleted]
        self._write_job_status(state, job, active=len(active))

    def _finish_job(self, state: JobState, job: dict[str, Any], kind: str, reason: str, message: str) -> None:
        state.condition = (kind, reason, message)
        self.event(f"Job {state.name} {kind}" + (f": {reason}: {message}" if reason else ""))
        self._write_job_status(state, job, active=0)

    def _write_job_status(self, state: JobState, job: dict[str, Any], *, active: int) -> None:
        status: dict[str, Any] = {"active": active, "failed": state.failed, "succeeded": state.succeeded}
        if job["spec"].get("suspend"):
            status["conditions"] = [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]
        if state.condition is not None:
            kind, reason, message = state.condition
            status["active"] = 0
            status["conditions"] = [{"type": kind, "status": "True", "reason": reason, "message": message,
                                     "lastTransitionTime": _now_iso()}]
        with self._lock:
            current = self._objects.get(("Job", state.name))
            if current is not None:
                current["status"] = status

    def _ensure(self, obj: dict[str, Any]) -> None:
        if self.get(obj["kind"], obj["metadata"]["name"]) is None:
            self.put(obj)
            self.event(f"{obj['kind']} {obj['metadata']['name']} created by the MPI Operator")

    def _sync_mpijob(self, state: MPIJobState, now: float) -> None:
        mpijob = self.get("MPIJob", state.name)
        if mpijob is None:
            return
        name = state.name
        if state.finished is not None:
            if not state.cleaned:
                policy = operator.clean_pod_policy(mpijob)
                if policy in ("Running", "All"):
                    for i in range(operator.worker_replicas(mpijob)):
                        pod = self.pods.get(operator.worker_name(mpijob, i))
                        if pod is None or pod.terminating:
                            continue
                        if policy == "All" or pod.phase in ("Running", "Pending"):
                            self.event(f"MPIJob {name} {state.finished}: cleanPodPolicy {policy} deletes {pod.name}")
                            pod.delete(wait=False)
                state.cleaned = True
            return
        suspended = operator.is_suspended(mpijob)
        launcher_name = f"{name}-launcher"
        launcher = self.get("Job", launcher_name)
        launcher_state = self.jobs.get(launcher_name)
        done = launcher_state is not None and launcher_state.condition is not None
        workers: list[PodRunner] = []
        if not done:
            self._ensure({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": {"app": name}},
                          "spec": {"clusterIP": "None", "publishNotReadyAddresses": False, "selector": {
                              operator.OPERATOR_NAME_LABEL: "mpi-operator", operator.JOB_NAME_LABEL: name}}})
            running = [i for i in range(operator.worker_replicas(mpijob))
                       if (p := self.pods.get(operator.worker_name(mpijob, i))) is not None
                       and not p.terminating and p.phase == "Running"]
            config = operator.config_map(mpijob, self.namespace, running)
            if self.get("ConfigMap", config["metadata"]["name"]) is None:
                self._ensure(config)
            else:  # updateDiscoverHostsInConfigMap: the running workers, at every sync
                self.put(config)
            if self.get("Secret", name + operator.SSH_SUFFIX) is None:
                self._ensure(operator.ssh_secret(mpijob, self.namespace))
            if not suspended:
                if not state.ever_unsuspended:
                    state.ever_unsuspended = True
                    self.event(f"MPIJob {name} is not suspended: the operator creates its pods")
                for i in range(operator.worker_replicas(mpijob)):
                    pod_name = operator.worker_name(mpijob, i)
                    existing = self.pods.get(pod_name)
                    if existing is None or existing.deleted:
                        self.create_pod(operator.worker_pod(mpijob, i, self.namespace))
                    workers.append(self.pods[pod_name])
            if launcher is None:
                policy = operator.launcher_creation_policy(mpijob)
                if policy == "AtStartup" or sum(1 for w in workers if w.ready) == len(workers):
                    job = operator.launcher_job(mpijob, self.namespace)
                    if suspended:
                        job["spec"]["suspend"] = True
                    self.put(job)
                    self.jobs[launcher_name] = JobState(launcher_name)
                    launcher = self.get("Job", launcher_name)
                    self.event(f"Job {launcher_name} created by the MPI Operator"
                               + (" (suspended)" if suspended else f" ({len(workers)} workers ready)"))
        if launcher is not None:
            if not suspended and launcher["spec"].get("suspend"):
                self._set_job_suspend(launcher_name, False)
            elif suspended and not launcher["spec"].get("suspend"):
                self._set_job_suspend(launcher_name, True)
        if suspended:
            for i in range(operator.worker_replicas(mpijob)):
                pod = self.pods.get(operator.worker_name(mpijob, i))
                if pod is not None and not pod.terminating:
                    self.event(f"MPIJob {name} suspended: deleting {pod.name}")
                    pod.delete(wait=False)
        if launcher_state is not None and launcher_state.condition is not None:
            kind, reason, message = launcher_state.condition
            state.finished = "Succeeded" if kind == "Complete" else "Failed"
            state.message = message if kind != "Complete" else f"MPIJob {self.namespace}/{name} successfully completed."
            self.event(f"MPIJob {name} {state.finished}" + (f": {reason}: {message}" if reason else ""))
        self._write_mpijob_status(state, suspended)

    def _set_job_suspend(self, name: str, value: bool) -> None:
        with self._lock:
            job = self._objects[("Job", name)]
            job["spec"]["suspend"] = value
        self.event(f"Job {name} {'suspended' if value else 'resumed'} by the MPI Operator")

    def _write_mpijob_status(self, state: MPIJobState, suspended: bool) -> None:
        conditions = [{"type": "Created", "status": "True", "reason": "MPIJobCreated"}]
        if suspended:
            conditions.append({"type": "Suspended", "status": "True", "reason": "MPIJobSuspended"})
        elif state.finished is None and state.ever_unsuspended:
            conditions.append({"type": "Running", "status": "True", "reason": "MPIJobRunning"})
        if state.finished is not None:
            conditions.append({"type": state.finished, "status": "True", "message": state.message,
                               "reason": f"MPIJob{state.finished}"})
        with self._lock:
            current = self._objects.get(("MPIJob", state.name))
            if current is not None:
                current["status"] = {"conditions": conditions}

    def _sync_endpoints(self) -> None:
        """Each Ready pod that a headless Service of its subdomain selects has a DNS name; others have none."""
        services = {o["metadata"]["name"]: o for o in self.objects() if o.get("kind") == "Service"}
        wanted: dict[str, tuple[str, str]] = {}
        for runner in list(self.pods.values()):
            service = services.get(runner.spec.get("subdomain") or "")
            if not runner.ready or service is None:
                continue
            if not self.labels_match((service.get("spec") or {}).get("selector") or {}, runner):
                continue
            fqdn = pod_dns_name(runner.pod, self.namespace)
            ip = self._pod_ip(runner)
            if fqdn and ip:
                wanted[runner.name] = (ip, fqdn)
        if wanted != self.published:
            for name in sorted(set(self.published) - set(wanted)):
                self.event(f"DNS: {self.published[name][1]} removed (pod {name} not ready)")
            for name in sorted(set(wanted) - set(self.published)):
                self.event(f"DNS: {wanted[name][1]} -> {wanted[name][0]} (pod {name} ready)")
            self.dns.set({f"{self.run_id}/{name}": record for name, record in wanted.items()})
            self.published = wanted

    def pod_ip(self, name: str) -> str | None:
        """The pod's address on the network (it keeps it across container restarts)."""
        runner = self.pods.get(name)
        return None if runner is None else self._pod_ip(runner)

    def _pod_ip(self, runner: PodRunner) -> str | None:
        uid = str(runner.pod["metadata"]["uid"])
        if uid not in self._ips:
            infra = self.podman("pod", "inspect", self.kubelet.podman_pod(runner.name), "--format",
                                "{{.InfraContainerID}}", check=False).stdout.strip()
            if not infra:
                return None
            ip = self.podman("inspect", infra, "--format",
                             f'{{{{(index .NetworkSettings.Networks "{self.network.name}").IPAddress}}}}',
                             check=False).stdout.strip()
            if not ip:
                return None
            self._ips[uid] = ip
        return self._ips[uid]

    # -- the loop ------------------------------------------------------------------------------
    def settled(self) -> bool:
        """Nothing left to happen: every MPIJob finished (and cleaned), or suspended with no Job active."""
        if any(p.terminating and not p.deleted for p in self.history):
            return False
        if any(not p.finished and not p.terminating and p.restart_policy == "Never" for p in self.pods.values()):
            return False
        for state in self.jobs.values():
            job = self.get("Job", state.name) or {}
            if state.condition is None and not (job.get("spec") or {}).get("suspend"):
                return False
        for state in self.mpijobs.values():
            mpijob = self.get("MPIJob", state.name)
            if state.finished is not None:
                if not state.cleaned:
                    return False
            elif mpijob is not None and not operator.is_suspended(mpijob):
                return False
        return True

    def step(self) -> None:
        now = time.monotonic()
        states = self.podman.containers(f"{RUN_LABEL}={self.run_id}")
        for runner in list(self.pods.values()):
            runner.sync(states, now)
        self._sync_endpoints()
        for state in list(self.mpijobs.values()):
            self._sync_mpijob(state, now)
        for state in list(self.jobs.values()):
            self._sync_job(state, now)

    def run(self, *, timeout_s: float, on_step: Callable[[Cluster], None] | None = None,
            until: Callable[[Cluster], bool] | None = None) -> Outcome:
        """Drive the controllers until the release settles (or `until` says so); ClusterError on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.step()
            if on_step is not None:
                on_step(self)
            if (until is not None and until(self)) or (until is None and self.settled()):
                return self.outcome()
            if time.monotonic() > deadline:
                raise ClusterError(f"the release did not settle within {timeout_s:.0f}s; events:\n"
                                   + "\n".join(self.events[-60:]) + "\nstill running:\n" + self.still_running())
            time.sleep(self.tick_s)

    def still_running(self, lines: int = 4) -> str:
        """Each live pod's running containers and their last log lines: what a stuck run waits on
        (the events alone end at the last change, which says nothing about who is waiting for what)."""
        parts = []
        for runner in self.pods.values():
            if runner.finished or runner.deleted:
                continue
            state = f"{runner.phase}{', ready' if runner.ready else ''}{', terminating' if runner.terminating else ''}"
            parts.append(f"pod {runner.name} ({state}, ip {self.pod_ip(runner.name)}, "
                         f"dns {self.published.get(runner.name, ('-', '-'))[0]})")
            for status in [*runner.init, *runner.main]:
                if status.state == "running":
                    tail = runner.log(status.name).splitlines()[-lines:]
                    parts.append(f"  {status.name}:" + "".join(f"\n  | {line}" for line in tail) if tail
                                 else f"  {status.name}: (no output)")
        return "\n".join(parts) or "(no pod)"

    def outcome(self) -> Outcome:
        phase, message = "Absent", ""
        for state in self.mpijobs.values():
            mpijob = self.get("MPIJob", state.name)
            if state.finished is not None:
                phase, message = state.finished, state.message
            elif mpijob is not None and operator.is_suspended(mpijob):
                phase = "Suspended"
            else:
                phase = "Running"
        return Outcome(phase, message, {name: s.condition for name, s in self.jobs.items()}, list(self.events))

    def close(self) -> None:
        """Remove every pod, container and volume of this cluster (not the network)."""
        for runner in self.history:
            if runner.terminating and runner._deleting is not None:
                runner._deleting.join(timeout=120)
            if not runner.deleted:
                runner.remove()
        pods = self.podman("pod", "ps", "-q", "--filter", f"label={RUN_LABEL}={self.run_id}", check=False).stdout
        for pod_id in pods.split():
            self.podman("pod", "rm", "-f", "-t", "0", pod_id, check=False)
        vols = self.podman("volume", "ls", "-q", "--filter", f"label={RUN_LABEL}={self.run_id}", check=False).stdout
        for vol in vols.split():
            self.podman("volume", "rm", "-f", vol, check=False)
        if self.published:
            try:
                self.dns.set({})
            except EngineError:
                pass
            self.published = {}
        if self.api is not None:
            self.api.close()
