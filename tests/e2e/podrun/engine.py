"""The container engine: Debian's podman (with runc), driven through its command line.

Every call goes through `Podman.__call__`, which raises `EngineError` with podman's own message
when a command fails, so a broken engine reads as one sentence in a test failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 120.0
AARDVARK_DIR = Path("/run/containers/networks/aardvark-dns")


class EngineError(RuntimeError):
    """podman refused or failed a command."""


@dataclass(frozen=True)
class ContainerState:
    """One container as `podman ps -a` reports it."""

    name: str
    state: str  # created, running, exited, stopped, ...
    exit_code: int
    started_at: float
    exited_at: float
    labels: dict[str, str]

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def terminated(self) -> bool:
        return self.state in ("exited", "stopped")


class Podman:
    """A thin, checked wrapper around the podman command line."""

    def __init__(self, binary: str = "podman") -> None:
        self.binary = binary

    def __call__(self, *args: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT_S,
                 merge_output: bool = False) -> subprocess.CompletedProcess[str]:
        stderr = subprocess.STDOUT if merge_output else subprocess.PIPE
        try:
            proc = subprocess.run([self.binary, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=stderr, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise EngineError(f"podman {' '.join(args[:3])} did not answer within {timeout:.0f}s") from None
        if check and proc.returncode != 0:
            message = (proc.stderr or proc.stdout or "").strip()
            raise EngineError(f"podman {' '.join(args[:6])} failed ({proc.returncode}): {message[-2000:]}")
        return proc

    # -- queries ------------------------------------------------------------------------------
    def containers(self, label: str) -> dict[str, ContainerState]:
        """Every container (running or not) carrying `label` (`key=value`), by name."""
        out = self("ps", "-a", "--filter", f"label={label}", "--format", "json").stdout
        states = {}
        for item in json.loads(out or "[]"):
            if item.get("IsInfra"):
                continue
            name = item["Names"][0]
            states[name] = ContainerState(
                name=name,
                state=str(item.get("State", "")),
                exit_code=int(item.get("ExitCode") or 0),
                started_at=float(item.get("StartedAt") or 0),
                exited_at=float(item.get("ExitedAt") or 0),
                labels=dict(item.get("Labels") or {}),
            )
        return states

    def logs(self, name: str) -> str:
        """The container's output, stdout and stderr in the order it wrote them (`kubectl logs`)."""
        return self("logs", name, merge_output=True, timeout=60).stdout

    def exec_ok(self, name: str, argv: Sequence[str], *, timeout: float) -> bool:
        """Run `argv` in the running container as its own user; True on exit status 0 (an exec probe)."""
        try:
            return self("exec", name, *argv, check=False, timeout=timeout).returncode == 0
        except EngineError:
            return False

    def image_exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def image_config(self, image: str) -> dict[str, Any]:
        """The image's config (User, Entrypoint, Cmd, Env, WorkingDir)."""
        out = self("image", "inspect", image, "--format", "json").stdout
        return dict(json.loads(out)[0].get("Config") or {})

    def network_gateway(self, network: str) -> str:
        out = self("network", "inspect", network, "--format", "json").stdout
        subnets = json.loads(out)[0].get("subnets") or []
        for subnet in subnets:
            if subnet.get("gateway"):
                return str(subnet["gateway"])
        raise EngineError(f"network {network} has no gateway address")


def cannot_run_containers(podman: Podman | None = None) -> str | None:
    """Why this machine cannot run the release's pods, or None when it can: podman must run as root
    (the pod network's gateway, where the test servers listen, is then an address of this machine)
    with netavark and aardvark-dns (pod DNS names follow readiness through aardvark's records)."""
    podman = podman or Podman()
    if shutil.which(podman.binary) is None:
        return "podman is not installed (`make setup` installs podman, runc and the containers.conf settings)"
    try:
        proc = podman("info", "--format", "{{.Host.Security.Rootless}} {{.Host.NetworkBackend}}", check=False,
                      timeout=60)
    except EngineError as exc:
        return str(exc)
    if proc.returncode != 0:
        return f"podman cannot run here: {proc.stderr.strip()[-1500:]}"
    rootless, _, backend = proc.stdout.strip().partition(" ")
    if rootless == "true":
        return "podman runs rootless here; the release's pods need rootful podman (run the tests as root)"
    if backend != "netavark":
        return f"podman's network backend is {backend or 'unknown'}, not netavark (with aardvark-dns)"
    return None


class DnsRecords:
    """Names on a podman network's DNS server (aardvark-dns) that come and go without touching any
    container's network: lines of our own in aardvark's per-network file, then SIGHUP to reload.

    This is how a headless Service's records follow its pods' readiness. netavark keeps lines it
    did not write when it adds or removes its own containers.
    """

    def __init__(self, network: str, folder: Path = AARDVARK_DIR) -> None:
        self.file = folder / network
        self.pid_file = folder / "aardvark.pid"
        self.ids: set[str] = set()

    @staticmethod
    def _id(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def set(self, records: dict[str, tuple[str, str]]) -> None:
        """Make `records` (key → (IPv4, name)) the whole set of names this object publishes."""
        if not self.file.exists():
            raise EngineError(f"{self.file} does not exist: the network's DNS server is not aardvark-dns "
                              "(podman with netavark and aardvark-dns is needed to publish pod names)")
        lines = self.file.read_text().splitlines()
        kept = [line for line in lines if line.split(" ", 1)[0] not in self.ids]
        self.ids = {self._id(key) for key in records}
        ours = [f"{self._id(key)} {ip}  {name}" for key, (ip, name) in sorted(records.items())]
        tmp = self.file.with_name(self.file.name + ".podrun")
        tmp.write_text("\n".join([*kept, *ours]) + "\n")
        os.replace(tmp, self.file)
        try:
            os.kill(int(self.pid_file.read_text().strip()), signal.SIGHUP)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot signal aardvark-dns to reload {self.file}: {exc}") from None

    def forget(self) -> None:
        """After the network is removed: its DNS file, which netavark keeps while lines of ours are in it."""
        try:
            self.file.unlink()
        except FileNotFoundError:
            return
        try:
            os.kill(int(self.pid_file.read_text().strip()), signal.SIGHUP)
        except (OSError, ValueError):
            pass
