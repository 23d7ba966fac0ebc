"""What the kubelet makes of a Pod: one podman pod, its volumes and its containers.

A Kubernetes pod becomes a podman pod (its infra container holds the network namespace, the
hostname and the shared IPC, as the pause container does), joined to the cluster's network with
Kubernetes' DNS search list. Its volumes are made the way the kubelet makes them: ConfigMaps,
Secrets and projected volumes as read-only files (root-owned, the item or default mode, the group
set to `fsGroup`), emptyDirs as podman volumes that outlive a container's restart (a memory
emptyDir is a tmpfs of its `sizeLimit`, kept mounted by a holder container for the pod's life).
Each container is created from the rendered container as it is: command and args (with `$(VAR)`
expansion), env with `secretKeyRef` / `configMapKeyRef` / `fieldRef` and `envFrom`, workingDir,
the security context (user, group, fsGroup, capabilities, no-new-privileges, read-only root),
memory and CPU limits, volumeMounts. Init containers run one after the other before the
containers; readiness probes are `podman exec` of the probe's command on its schedule; restarts
follow `restartPolicy` with the kubelet's doubling back-off; deletion stops every container with
the pod's `terminationGracePeriodSeconds`.

`container_argv` (the translation of one container) and the volume helpers are pure and tested
without a container engine.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .engine import ContainerState, EngineError, Podman

RUN_LABEL = "pipelora.podrun.run"
POD_LABEL = "pipelora.podrun.pod"
CONTAINER_LABEL = "pipelora.podrun.container"
DEFAULT_GRACE_S = 30
CLUSTER_DOMAIN = "cluster.local"
PAGE_SIZE = 4096
MAX_BACKOFF_S = 300.0
TERMINATION_LOG = "/dev/termination-log"
# FallbackToLogsOnError: the log's last 80 lines, at most 2048 bytes (kubelet's limits).
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


class PodConfigError(Exception):
    """The pod cannot be started as specified (the kubelet's CreateContainerConfigError and kin)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class ObjectSource(Protocol):
    """The API objects the kubelet reads: Secrets and ConfigMaps by name (data already decoded)."""

    def secret_data(self, name: str) -> dict[str, bytes] | None: ...

    def config_map_data(self, name: str) -> dict[str, bytes] | None: ...

    def service_account_token(self, service_account: str, audience: str | None) -> str: ...


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes resource quantity (`64Mi`, `1Gi`, `500m`, `4`) as a number (bytes or cores)."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, suffix = float(match.group(1)), match.group(2)
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    raise ValueError(f"not a Kubernetes quantity: {text!r}")


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_refs(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: defined variables replaced, `$$` → `$`, the rest kept as is."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _REF.sub(sub, text)


def _field_ref(path: str, pod: dict[str, Any], namespace: str) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": namespace,
        "metadata.uid": meta.get("uid", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "spec.nodeName": spec.get("nodeName", "podrun"),
        "status.hostIP": "",
        "status.podIP": "",
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise PodConfigError("CreateContainerConfigError", f"fieldRef {path} is not supported here")


def resolve_env(container: dict[str, Any], pod: dict[str, Any], *, namespace: str, objects: ObjectSource,
                service_env: Mapping[str, str] = {}) -> dict[str, str]:
    """The container's environment as the kubelet builds it: service variables, then `envFrom`,
    then `env` (later wins), each value `$(VAR)`-expanded against what precedes it."""
    env: dict[str, str] = dict(service_env)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        if "secretRef" in source:
            ref, data, kind = source["secretRef"], objects.secret_data(source["secretRef"]["name"]), "secret"
        elif "configMapRef" in source:
            ref, data, kind = source["configMapRef"], objects.config_map_data(source["configMapRef"]["name"]), "configmap"
        else:
            raise PodConfigError("CreateContainerConfigError", f"envFrom source {source} is not supported")
        if data is None:
            if ref.get("optional"):
                continue
            raise PodConfigError("CreateContainerConfigError", f'{kind} "{ref["name"]}" not found')
        for key, value in data.items():
            env[prefix + key] = value.decode()
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand_refs(str(item.get("value", "")), env)
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            is_secret = "secretKeyRef" in source
            ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
            data = objects.secret_data(ref["name"]) if is_secret else objects.config_map_data(ref["name"])
            kind = "secret" if is_secret else "configmap"
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                what = f'{kind} "{ref["name"]}" not found' if data is None else \
                    f'couldn\'t find key {ref["key"]} in {kind.capitalize()} {namespace}/{ref["name"]}'
                raise PodConfigError("CreateContainerConfigError", what)
            env[name] = data[ref["key"]].decode()
        elif "fieldRef" in source:
            env[name] = _field_ref(source["fieldRef"]["fieldPath"], pod, namespace)
        else:
            raise PodConfigError("CreateContainerConfigError", f"env {name}: {list(source)} is not supported here")
    return env


def command_line(container: dict[str, Any], env: Mapping[str, str]) -> tuple[list[str] | None, list[str] | None]:
    """(entrypoint, args) for podman: `command` replaces the image's ENTRYPOINT (and drops its CMD),
    `args` replaces CMD; both `$(VAR)`-expanded. None keeps the image's."""
    command = container.get("command")
    args = container.get("args")
    entrypoint = [expand_refs(str(a), env) for a in command] if command else None
    arguments = [expand_refs(str(a), env) for a in args] if args else None
    if entrypoint is not None and arguments is None:
        arguments = []
    return entrypoint, arguments


def security_args(pod_spec: dict[str, Any], container: dict[str, Any], *, image_user: str = "") -> list[str]:
    """The pod's and the container's securityContext (the container's wins) as podman flags."""
    pod_ctx = pod_spec.get("securityContext") or {}
    ctx = container.get("securityContext") or {}
    user = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
    group = ctx.get("runAsGroup", pod_ctx.get("runAsGroup"))
    non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
    argv: list[str] = []
    if user is not None:
        argv += ["--user", f"{user}:{group}" if group is not None else str(user)]
    elif group is not None:
        argv += ["--user", f"{image_user.split(':')[0] or 0}:{group}"]
    if non_root:
        effective = str(user) if user is not None else (image_user.split(":")[0] or "0")
        if effective in ("0", "root"):
            raise PodConfigError("CreateContainerConfigError", "container has runAsNonRoot and image will run as root")
        if not effective.isdigit():
            raise PodConfigError("CreateContainerConfigError",
                                 f"container has runAsNonRoot and image has non-numeric user ({effective}), "
                                 "cannot verify user is non-root")
    groups = [*([pod_ctx["fsGroup"]] if pod_ctx.get("fsGroup") is not None else []),
              *(pod_ctx.get("supplementalGroups") or [])]
    for gid in groups:
        argv += ["--group-add", str(gid)]
    caps = ctx.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        argv += ["--cap-drop", str(cap)]
    for cap in caps.get("add") or []:
        argv += ["--cap-add", str(cap)]
    if ctx.get("privileged"):
        argv.append("--privileged")
    if ctx.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    if ctx.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
    if seccomp == "Unconfined":
        argv += ["--security-opt", "seccomp=unconfined"]  # RuntimeDefault is podman's default profile
    return argv


def resource_args(container: dict[str, Any]) -> list[str]:
    """Limits become cgroup limits (requests only place pods, and there is one node)."""
    limits = (container.get("resources") or {}).get("limits") or {}
    argv: list[str] = []
    if "memory" in limits:
        argv += ["--memory", str(int(parse_quantity(limits["memory"])))]
    if "cpu" in limits:
        argv += ["--cpus", f"{parse_quantity(limits['cpu']):g}"]
    return argv


@dataclass(frozen=True)
class Mount:
    """Where a pod volume's content is on this machine: a folder to bind, or a podman volume."""

    kind: str  # "bind" or "volume"
    source: str
    read_only: bool = False


def mount_args(container: dict[str, Any], mounts: Mapping[str, Mount]) -> list[str]:
    argv: list[str] = []
    for vm in container.get("volumeMounts") or []:
        name = vm["name"]
        if name not in mounts:
            raise PodConfigError("CreateContainerConfigError", f"volumeMount {name} names no volume of the pod")
        mount = mounts[name]
        read_only = bool(vm.get("readOnly")) or mount.read_only
        source = mount.source
        sub_path = vm.get("subPath")
        if sub_path:
            if mount.kind != "bind":
                raise PodConfigError("CreateContainerConfigError", f"subPath on {name} is not supported here")
            source = str(Path(source) / sub_path)
        options = [f"type={mount.kind}", f"source={source}", f"destination={vm['mountPath']}"]
        if read_only:
            options.append("ro=true")
        argv += ["--mount", ",".join(options)]
    return argv


def container_argv(*, name: str, podman_pod: str, labels: Mapping[str, str], container: dict[str, Any],
                   pod: dict[str, Any], env: Mapping[str, str], mounts: Mapping[str, Mount],
                   image_user: str = "", termination_log: str | None = None) -> list[str]:
    """`podman create …` for one rendered container of `pod`, nothing re-typed."""
    pod_spec = pod.get("spec") or {}
    argv = ["create", "--name", name, "--pod", podman_pod, "--pull", "never", "--init=false"]
    for key, value in sorted(labels.items()):
        argv += ["--label", f"{key}={value}"]
    grace = pod_spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
    argv += ["--stop-timeout", str(int(grace))]
    entrypoint, arguments = command_line(container, env)
    if entrypoint is not None:
        argv += ["--entrypoint", json.dumps(entrypoint)]
    if container.get("workingDir"):
        argv += ["--workdir", str(container["workingDir"])]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    argv += security_args(pod_spec, container, image_user=image_user)
    argv += resource_args(container)
    argv += mount_args(container, mounts)
    if termination_log is not None:
        path = container.get("terminationMessagePath") or TERMINATION_LOG
        argv += ["--mount", f"type=bind,source={termination_log},destination={path}"]
    if container.get("tty"):
        argv.append("--tty")
    argv.append(str(container["image"]))
    if arguments is not None:
        argv += arguments
    return argv


# -- volumes ------------------------------------------------------------------------------------
def _items(data: Mapping[str, bytes], items: list[dict[str, Any]] | None, *, what: str,
           optional: bool) -> list[tuple[str, bytes, int | None]]:
    if not items:
        return [(key, value, None) for key, value in sorted(data.items())]
    out = []
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise PodConfigError("CreateContainerConfigError", f"{what} has no key {item['key']}")
        out.append((str(item["path"]), data[item["key"]], item.get("mode")))
    return out


def write_files(folder: Path, files: list[tuple[str, bytes, int | None]], *, default_mode: int,
                fs_group: int | None) -> None:
    """Files of a ConfigMap, Secret or projected volume as the kubelet writes them: root-owned,
    the item's mode or the volume's default; with `fsGroup`, group-owned by it and group-readable
    (the kubelet's ownership pass over read-only volumes adds 0440)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    for rel, content, mode in files:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        final = default_mode if mode is None else mode
        if fs_group is not None:
            final |= 0o440
            if os.geteuid() == 0:
                os.chown(path, 0, fs_group)
        path.chmod(final)
    if fs_group is not None and os.geteuid() == 0:
        for sub in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
            os.chown(sub, 0, fs_group)
            sub.chmod(0o2755)


def volume_files(volume: dict[str, Any], pod: dict[str, Any], *, namespace: str,
                 objects: ObjectSource) -> tuple[list[tuple[str, bytes, int | None]], int] | None:
    """The files of a ConfigMap, Secret or projected volume and its default mode; None for other kinds."""
    for kind, name_key, lookup in (("configMap", "name", objects.config_map_data),
                                   ("secret", "secretName", objects.secret_data)):
        if kind in volume:
            src = volume[kind]
            what = f"{kind.lower()} {src[name_key]}"
            mode = src.get("defaultMode", 0o644)
            data = lookup(src[name_key])
            if data is None:
                if src.get("optional"):
                    return [], mode
                raise PodConfigError("FailedMount", f'{kind.lower()} "{src[name_key]}" not found')
            return _items(data, src.get("items"), what=what, optional=bool(src.get("optional"))), mode
    if "projected" in volume:
        src = volume["projected"]
        files: list[tuple[str, bytes, int | None]] = []
        for source in src.get("sources") or []:
            if "serviceAccountToken" in source:
                token = source["serviceAccountToken"]
                sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
                files.append((token["path"], objects.service_account_token(sa, token.get("audience")).encode(), None))
            elif "configMap" in source or "secret" in source:
                sub = volume_files({k: v for k, v in source.items()} if "configMap" in source else
                                   {"secret": {"secretName": source["secret"]["name"],
                                               **{k: v for k, v in source["secret"].items() if k != "name"}}},
                                   pod, namespace=namespace, objects=objects)
                assert sub is not None
                files += sub[0]
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    value = _field_ref(item["fieldRef"]["fieldPath"], pod, namespace)
                    files.append((item["path"], value.encode(), item.get("mode")))
            else:
                raise PodConfigError("FailedMount", f"projected source {list(source)} is not supported here")
        return files, src.get("defaultMode", 0o644)
    return None


def tmpfs_options(empty_dir: dict[str, Any]) -> list[str]:
    """`podman volume create` options of a memory emptyDir: a tmpfs of its sizeLimit.

    The size is given in pages (`nr_blocks`): podman 4.3 takes a `size` option for a project quota
    and refuses it on filesystems without one, even for a tmpfs.
    """
    opts = ["mode=0777"]
    if empty_dir.get("sizeLimit") is not None:
        pages = max(1, -(-int(parse_quantity(empty_dir["sizeLimit"])) // PAGE_SIZE))
        opts.insert(0, f"nr_blocks={pages}")
    return ["--opt", "type=tmpfs", "--opt", "device=tmpfs", "--opt", "o=" + ",".join(opts)]


def dns_args(pod: dict[str, Any], namespace: str) -> list[str]:
    """ClusterFirst DNS: the namespace's search list, the pod's own searches and options, ndots:5."""
    spec = pod.get("spec") or {}
    config = spec.get("dnsConfig") or {}
    searches = [f"{namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN,
                *(config.get("searches") or [])]
    options = {"ndots": "5"}
    for option in config.get("options") or []:
        options[option["name"]] = option.get("value", "")
    argv: list[str] = []
    for search in searches:
        argv += ["--dns-search", search]
    for key, value in options.items():
        argv += ["--dns-option", f"{key}:{value}" if value != "" else key]
    for alias in spec.get("hostAliases") or []:
        for host in alias.get("hostnames") or []:
            argv += ["--add-host", f"{host}:{alias['ip']}"]
    return argv


def pod_dns_name(pod: dict[str, Any], namespace: str) -> str | None:
    """`<hostname>.<subdomain>.<ns>.svc.cluster.local`, the name a headless Service gives a Ready pod."""
    spec = pod.get("spec") or {}
    if not spec.get("subdomain"):
        return None
    hostname = spec.get("hostname") or pod["metadata"]["name"]
    return f"{hostname}.{spec['subdomain']}.{namespace}.svc.{CLUSTER_DOMAIN}"


# -- running pods -------------------------------------------------------------------------------
@dataclass
class ContainerStatus:
    """The kubelet's view of one container of a pod."""

    name: str
    init: bool
    restart_count: int = 0
    started: bool = False  # created and started at least once in the current instance
    state: str = "waiting"  # waiting, running, terminated
    exit_code: int | None = None
    message: str = ""  # the termination message of the last terminated instance
    last: tuple[int, str] | None = None  # (exit code, message) of the instance before (lastState)
    ready: bool = False
    restart_at: float | None = None
    probe_next: float = 0.0
    probe_failures: int = 0
    logs: list[str] = field(default_factory=list)  # earlier instances' logs (kubectl logs --previous)


class Kubelet:
    """Runs Pods as podman pods on one network; every object it makes carries the run's label."""

    def __init__(self, *, podman: Podman, network: str, run_id: str, workdir: Path, namespace: str,
                 objects: ObjectSource, service_env: Callable[[], dict[str, str]] = dict,
                 backoff_base_s: float = 10.0, infra_image: str, event: Callable[[str], None] = print) -> None:
        self.podman = podman
        self.network = network
        self.run_id = run_id
        self.workdir = workdir
        self.namespace = namespace
        self.objects = objects
        self.service_env = service_env
        self.backoff_base_s = backoff_base_s
        self.infra_image = infra_image
        self.event = event
        self._image_users: dict[str, str] = {}

    def container_name(self, pod: str, container: str) -> str:
        return f"{self.run_id}-{pod}-{container}"

    def podman_pod(self, pod: str) -> str:
        return f"{self.run_id}-{pod}"

    def image_user(self, image: str) -> str:
        if image not in self._image_users:
            self._image_users[image] = str(self.podman.image_config(image).get("User") or "")
        return self._image_users[image]

    def backoff(self, restarts: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff_base_s * (2 ** max(0, restarts - 1)))


class PodRunner:
    """One pod's life: Pending (init containers) → Running → Succeeded / Failed, or deleted."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        self.k = kubelet
        self.pod = pod
        self.name: str = pod["metadata"]["name"]
        self.spec: dict[str, Any] = pod["spec"]
        # This pod's own files (a pod of the same name made later has other ones).
        self.folder = kubelet.workdir / "pods" / f"{self.name}-{str(pod['metadata'].get('uid', ''))[:8]}"
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.terminating = False  # deletion asked for: stopping within the grace period
        self.deleted = False  # gone: containers stopped, logs kept, podman pod removed
        self._deleting: threading.Thread | None = None
        self.created_at = time.monotonic()
        self.init = [ContainerStatus(c["name"], True) for c in self.spec.get("initContainers") or []]
        self.main = [ContainerStatus(c["name"], False) for c in self.spec["containers"]]
        self.init_index = 0
        self.mounts: dict[str, Mount] = {}
        self.volumes: list[str] = []
        self.final_logs: dict[str, str] = {}

    # -- helpers -------------------------------------------------------------------------------
    @property
    def restart_policy(self) -> str:
        return str(self.spec.get("restartPolicy") or "Always")

    @property
    def grace_s(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))

    @property
    def ready(self) -> bool:
        return self.phase == "Running" and not self.terminating and all(c.ready for c in self.main)

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    def spec_of(self, status: ContainerStatus) -> dict[str, Any]:
        group = self.spec.get("initContainers") if status.init else self.spec["containers"]
        return next(c for c in group or [] if c["name"] == status.name)

    def cname(self, status: ContainerStatus) -> str:
        return self.k.container_name(self.name, status.name)

    def labels(self, container: str | None = None) -> dict[str, str]:
        labels = {RUN_LABEL: self.k.run_id, POD_LABEL: self.name}
        if container:
            labels[CONTAINER_LABEL] = container
        return labels

    def fail(self, reason: str, message: str) -> None:
        self.phase, self.reason, self.message = "Failed", reason, message
        self.k.event(f"pod {self.name} failed: {reason}: {message}")

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Make the pod's volumes and its podman pod; its containers start in `sync`."""
        try:
            self._make_volumes()
        except PodConfigError as exc:
            self.fail(exc.reason, exc.message)
            return
        hostname = self.spec.get("hostname") or self.name
        argv = ["pod", "create", "--name", self.k.podman_pod(self.name), "--network", self.k.network,
                "--hostname", hostname, "--infra-image", self.k.infra_image, "--infra-command", "sleep infinity",
                "--share", "ipc,net,uts", *dns_args(self.pod, self.k.namespace)]
        for key, value in self.labels().items():
            argv += ["--label", f"{key}={value}"]
        self.k.podman(*argv)
        self.k.podman("pod", "start", self.k.podman_pod(self.name))
        tmpfs = [name for name, mount in self.mounts.items() if mount.kind == "volume" and name in self._memory]
        if tmpfs:
            # Keeps the pod's memory emptyDirs mounted across container restarts, as the pod's own
            # tmpfs outlives its containers in Kubernetes.
            holder = ["create", "--name", self.k.container_name(self.name, "volumes"), "--pod",
                      self.k.podman_pod(self.name), "--pull", "never", "--entrypoint", '["sleep","infinity"]',
                      "--label", f"{RUN_LABEL}=holder-{self.k.run_id}"]
            for name in tmpfs:
                holder += ["--mount", f"type=volume,source={self.mounts[name].source},destination=/volumes/{name}"]
            holder.append(self.k.infra_image)
            self.k.podman(*holder)
            self.k.podman("start", self.k.container_name(self.name, "volumes"))
        self.k.event(f"pod {self.name} scheduled")

    def _make_volumes(self) -> None:
        self._memory: set[str] = set()
        folder = self.folder / "volumes"
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        for volume in self.spec.get("volumes") or []:
            name = volume["name"]
            files = volume_files(volume, self.pod, namespace=self.k.namespace, objects=self.k.objects)
            if files is not None:
                target = folder / name
                write_files(target, files[0], default_mode=files[1], fs_group=fs_group)
                self.mounts[name] = Mount("bind", str(target), read_only=True)
            elif "emptyDir" in volume:
                empty_dir = volume["emptyDir"] or {}
                vol = f"{self.k.run_id}-{self.name}-{name}"
                argv = ["volume", "create", "--label", f"{RUN_LABEL}={self.k.run_id}"]
                if empty_dir.get("medium") == "Memory":
                    argv += tmpfs_options(empty_dir)
                    self._memory.add(name)
                self.k.podman(*argv, vol)
                self.volumes.append(vol)
                self.mounts[name] = Mount("volume", vol)
            else:
                raise PodConfigError("FailedMount", f"volume {name} ({[k for k in volume if k != 'name']}) "
                                                    "is not supported here")

    def _create_and_start(self, status: ContainerStatus) -> bool:
        container = self.spec_of(status)
        try:
            env = resolve_env(container, self.pod, namespace=self.k.namespace, objects=self.k.objects,
                              service_env=self.k.service_env())
            termination_log = self._termination_log(status)
            argv = container_argv(name=self.cname(status), podman_pod=self.k.podman_pod(self.name),
                                  labels=self.labels(status.name), container=container, pod=self.pod, env=env,
                                  mounts=self.mounts, image_user=self.k.image_user(container["image"]),
                                  termination_log=str(termination_log))
        except PodConfigError as exc:
            self.fail(exc.reason, f"container {status.name}: {exc.message}")
            return False
        if not self.k.podman.image_exists(container["image"]):
            policy = container.get("imagePullPolicy", "IfNotPresent")
            reason = "ErrImageNeverPull" if policy == "Never" else "ErrImagePull"
            self.fail(reason, f"container {status.name}: image {container['image']} is not present "
                              "and no registry can be reached")
            return False
        self.k.podman(*argv)
        self.k.podman("start", self.cname(status))
        status.started, status.state, status.exit_code, status.ready = True, "running", None, False
        probe = container.get("readinessProbe")
        status.probe_next = time.monotonic() + float((probe or {}).get("initialDelaySeconds", 0))
        status.probe_failures = 0
        return True

    def _termination_log(self, status: ContainerStatus) -> Path:
        path = self._termination_log_path(status)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        path.chmod(0o666)
        return path

    def _termination_message(self, status: ContainerStatus, exit_code: int) -> str:
        """The termination-log file, or with FallbackToLogsOnError and a failure, the log's tail."""
        try:
            text = self._termination_log_path(status).read_text(errors="replace")
        except OSError:
            text = ""
        if text.strip() or exit_code == 0:
            return text
        if self.spec_of(status).get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return text
        tail = "\n".join(self._log_now(status).splitlines()[-FALLBACK_LINES:])
        return tail.encode()[-FALLBACK_BYTES:].decode(errors="replace")

    def _termination_log_path(self, status: ContainerStatus) -> Path:
        return self.folder / "termination" / f"{status.name}-{status.restart_count}"

    def _restart(self, status: ContainerStatus) -> None:
        """Keep the terminated instance's log (`--previous`), then a fresh container of the same spec."""
        status.logs.append(self._log_now(status))
        status.last = (status.exit_code if status.exit_code is not None else -1, status.message)
        self.k.podman("rm", "-f", self.cname(status), check=False)
        status.restart_count += 1
        status.restart_at = None
        self.k.event(f"pod {self.name}: container {status.name} restarted (restart {status.restart_count})")
        self._create_and_start(status)

    # -- the sync loop -------------------------------------------------------------------------
    def sync(self, states: Mapping[str, ContainerState], now: float) -> None:
        if self.terminating or self.finished:
            return
        if self.init_index < len(self.init):
            self._sync_init(states, now)
            if self.init_index < len(self.init) or self.finished:
                return
        if not any(c.started for c in self.main):
            for status in self.main:
                if not self._create_and_start(status):
                    return
            self.phase = "Running"
            self.k.event(f"pod {self.name} running")
            return
        self._sync_main(states, now)

    def _terminated(self, status: ContainerStatus, states: Mapping[str, ContainerState]) -> ContainerState | None:
        state = states.get(self.cname(status))
        if state is None or not state.terminated:
            return None
        status.state, status.exit_code, status.ready = "terminated", state.exit_code, False
        status.message = self._termination_message(status, state.exit_code)
        return state

    def _sync_init(self, states: Mapping[str, ContainerState], now: float) -> None:
        status = self.init[self.init_index]
        if not status.started:
            self._create_and_start(status)
            return
        if status.restart_at is not None:
            if now >= status.restart_at:
                self._restart(status)
            return
        state = self._terminated(status, states)
        if state is None:
            return
        if state.exit_code == 0:
            self.init_index += 1
            return
        if self.restart_policy == "Never":
            self.fail("Init:Error", f"init container {status.name} exited with status {state.exit_code}")
            return
        status.restart_at = now + self.k.backoff(status.restart_count + 1)

    def _sync_main(self, states: Mapping[str, ContainerState], now: float) -> None:
        for status in self.main:
            if status.restart_at is not None:
                if now >= status.restart_at:
                    self._restart(status)
                continue
            if status.state == "terminated":
                continue
            state = self._terminated(status, states)
            if state is None:
                self._probe(status, now)
                continue
            self.k.event(f"pod {self.name}: container {status.name} exited with status {state.exit_code}")
            policy = self.restart_policy
            if policy == "Always" or (policy == "OnFailure" and state.exit_code != 0):
                status.restart_at = now + self.k.backoff(status.restart_count + 1)
        if all(s.state == "terminated" and s.restart_at is None for s in self.main):
            codes = [s.exit_code for s in self.main]
            if all(code == 0 for code in codes):
                self.phase = "Succeeded"
                self.k.event(f"pod {self.name} succeeded")
            else:
                bad = next(s for s in self.main if s.exit_code != 0)
                self.fail("Error", f"container {bad.name} exited with status {bad.exit_code}")

    def _probe(self, status: ContainerStatus, now: float) -> None:
        probe = self.spec_of(status).get("readinessProbe")
        if probe is None:
            status.ready = True
            return
        if now < status.probe_next:
            return
        status.probe_next = now + float(probe.get("periodSeconds", 10))
        if "exec" not in probe:
            raise PodConfigError("Unsupported", f"readiness probe {list(probe)} is not supported here (exec only)")
        ok = self.k.podman.exec_ok(self.cname(status), list(probe["exec"]["command"]),
                                   timeout=float(probe.get("timeoutSeconds", 1)) + 5)
        if ok:
            status.probe_failures = 0
            if not status.ready:
                status.ready = True
                self.k.event(f"pod {self.name}: container {status.name} ready")
        else:
            status.probe_failures += 1
            if status.ready and status.probe_failures >= int(probe.get("failureThreshold", 3)):
                status.ready = False
                self.k.event(f"pod {self.name}: container {status.name} not ready")

    # -- logs, kill, delete --------------------------------------------------------------------
    def _log_now(self, status: ContainerStatus) -> str:
        try:
            return self.k.podman.logs(self.cname(status))
        except EngineError:
            return ""

    def status_of(self, container: str) -> ContainerStatus:
        for status in [*self.init, *self.main]:
            if status.name == container:
                return status
        raise KeyError(f"pod {self.name} has no container {container}")

    def log(self, container: str, *, previous: bool = False) -> str:
        """`kubectl logs [--previous]`: the current (or the previous) instance's output."""
        status = self.status_of(container)
        if previous:
            return status.logs[-1] if status.logs else ""
        if container in self.final_logs:
            return self.final_logs[container]
        return self._log_now(status) if status.started else ""

    def kill(self, container: str, signal: str = "KILL") -> None:
        status = self.status_of(container)
        self.k.podman("kill", "--signal", signal, self.cname(status))
        self.k.event(f"pod {self.name}: container {container} sent SIG{signal}")

    def delete(self, *, grace_s: int | None = None, wait: bool = True) -> None:
        """Graceful deletion: the pod stops being Ready at once; SIGTERM to every running container,
        SIGKILL after the grace period; the containers' logs are kept (as a cluster's log collector
        would) before the podman pod goes. With `wait=False` this happens in the background, as a
        pod terminates in Kubernetes while its controllers carry on."""
        if self.terminating:
            if wait and self._deleting is not None:
                self._deleting.join()
            return
        self.terminating = True
        grace = self.grace_s if grace_s is None else grace_s
        self.k.event(f"pod {self.name} terminating (grace period {grace}s)")

        def finish() -> None:
            running = [self.cname(s) for s in [*self.init, *self.main] if s.started]
            if running and not self.finished:
                self.k.podman("stop", "-t", str(grace), *running, check=False, timeout=grace + 60)
            self.final_logs = {s.name: self._log_now(s) for s in [*self.init, *self.main] if s.started}
            self.remove()
            self.deleted = True
            self.k.event(f"pod {self.name} deleted")

        if wait:
            finish()
        else:
            self._deleting = threading.Thread(target=finish, name=f"delete-{self.name}", daemon=True)
            self._deleting.start()

    def remove(self) -> None:
        """Remove the podman pod and the pod's volumes (no grace: the pod is over)."""
        for status in [*self.init, *self.main]:
            if status.started and status.name not in self.final_logs:
                self.final_logs[status.name] = self._log_now(status)
        self.k.podman("pod", "rm", "-f", "-t", "0", self.k.podman_pod(self.name), check=False, timeout=120)
        for vol in self.volumes:
            self.k.podman("volume", "rm", "-f", vol, check=False)
        self.volumes = []


def decode_secret(secret: dict[str, Any]) -> dict[str, bytes]:
    """A Secret's `data` (base64) and `stringData` (plain, wins) as bytes."""
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: str(v).encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def decode_config_map(config_map: dict[str, Any]) -> dict[str, bytes]:
    data = {k: str(v).encode() for k, v in (config_map.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (config_map.get("binaryData") or {}).items()})
    return data
