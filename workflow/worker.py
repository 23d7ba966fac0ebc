"""`pipelora-k8s worker`: PID 1 of a worker pod.

The MPI Operator's launcher starts ranks on a worker through ssh, so the pod's main process is
the only thing Kubernetes talks to: its stdout is `kubectl logs`, and it alone receives SIGTERM
on eviction or preemption. This entrypoint therefore
- generates fresh ssh host keys at every start (a public image must never carry private keys);
- records the pod's environment for the ranks sshd will start without it (`pipelora.podenv`);
- runs sshd as its child and marks the pod ready once sshd listens (a file the readiness probe
  tests: a TCP probe would add two sshd lines to the log every few seconds);
- relays the lines its ranks append to the pod's runtime folder to its own stdout, in order;
- forwards SIGTERM to its ranks and waits for them (they commit a checkpoint at the next step
  boundary) within the grace period, then stops sshd;
- reaps orphans, as PID 1 must.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pipelora.errors import PipeloraError
from pipelora.launch import pod_env_file, pod_runtime_dir, rank_relay_dir, ready_file
from pipelora.podenv import record_pod_env

DEFAULT_SSHD_CONFIG = "/home/mpiuser/.sshd/sshd_config"
# A rank is a process Open MPI started: its environment carries its rank in the world.
RANK_MARKER = b"OMPI_COMM_WORLD_RANK="
RELAY_POLL_S = 0.1


class WorkerError(PipeloraError):
    """The worker pod cannot serve ranks (sshd missing, a bad config)."""


def sshd_setting(config_text: str, key: str) -> list[str]:
    """Values of `key` in an sshd_config (case-insensitive keys, first word of each value)."""
    pattern = re.compile(rf"^\s*{re.escape(key)}\s+(\S+)", re.I | re.M)
    return pattern.findall(config_text)


def generate_host_keys(config_text: str) -> list[Path]:
    """Fresh `ssh_host_<kind>_key` files for each such HostKey of the config; returns their paths.

    Other HostKey entries (the MPI Operator's Secret mounts its key as one) are left alone.
    """
    made = []
    for value in sshd_setting(config_text, "HostKey"):
        match = re.search(r"ssh_host_(\w+)_key$", value)
        if not match:
            continue
        path = Path(value)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (path, path.with_name(path.name + ".pub")):
            stale.unlink(missing_ok=True)
        try:
            subprocess.run(["ssh-keygen", "-q", "-t", match.group(1), "-N", "", "-f", str(path)], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise WorkerError(f"cannot generate the ssh host key {path}: {exc}; the image needs ssh-keygen "
                              f"and a writable {path.parent}") from None
        made.append(path)
    return made


def children_of(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), breadth first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def is_rank(pid: int) -> bool:
    try:
        return RANK_MARKER in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


@dataclass
class LineRelay:
    """Follows every `*.log` file in a folder and writes their complete lines to `out`, in order."""

    folder: Path
    out: TextIO
    offsets: dict[Path, int] = field(default_factory=dict)
    partial: dict[Path, bytes] = field(default_factory=dict)

    def poll(self) -> int:
        """Relay what is new; returns the number of lines written."""
        written = 0
        try:
            files = sorted(self.folder.glob("*.log"))
        except OSError:
            return 0
        for path in files:
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets.get(path, 0))
                    data = fh.read()
            except OSError:
                continue
            if not data:
                continue
            self.offsets[path] = self.offsets.get(path, 0) + len(data)
            data = self.partial.pop(path, b"") + data
            *lines, rest = data.split(b"\n")
            if rest:
                self.partial[path] = rest
            if lines:
                self.out.write("".join(line.decode("utf-8", "replace") + "\n" for line in lines))
                written += len(lines)
        if written:
            self.out.flush()
        return written

    def finish(self) -> None:
        """Relay everything, including a last line without its newline."""
        self.poll()
        for rest in self.partial.values():
            self.out.write(rest.decode("utf-8", "replace") + "\n")
        self.partial.clear()
        self.out.flush()


class WorkerEntrypoint:
    """The worker pod's PID 1 (see the module docstring)."""

    def __init__(self, *, sshd_config: str, grace_s: float, sshd: str = "/usr/sbin/sshd",
                 runtime: Path | None = None, out: TextIO = sys.stdout) -> None:
        self.sshd_config = sshd_config
        self.grace_s = grace_s
        self.sshd_bin = sshd
        self.runtime = runtime or pod_runtime_dir()
        self.out = out
        self.stopping = threading.Event()
        self.received: int = signal.SIGTERM
        self.pid_file: str | None = None
        self.sshd: subprocess.Popen[bytes] | None = None
        self.relay = LineRelay(rank_relay_dir(self.runtime), out)

    def say(self, text: str) -> None:
        self.out.write(f"[worker] {text}\n")
        self.out.flush()

    def prepare(self) -> None:
        try:
            config_text = Path(self.sshd_config).read_text()
        except OSError as exc:
            raise WorkerError(f"cannot read the sshd config {self.sshd_config}: {exc.strerror}") from None
        rank_relay_dir(self.runtime).mkdir(parents=True, exist_ok=True)
        ready_file(self.runtime).unlink(missing_ok=True)
        keys = generate_host_keys(config_text)
        names = record_pod_env(pod_env_file(self.runtime), os.environ)
        self.say(f"host keys generated ({', '.join(k.name for k in keys) or 'none'}); "
                 f"{len(names)} pod variables recorded for the ranks")
        self.pid_file = next(iter(sshd_setting(config_text, "PidFile")), None)
        if self.pid_file:
            Path(self.pid_file).unlink(missing_ok=True)

    def start_sshd(self) -> None:
        if not Path(self.sshd_bin).exists():
            raise WorkerError(f"{self.sshd_bin} does not exist; the worker image needs openssh-server")
        # -D: stay in the foreground as our child; -e: its log on stderr, which is ours (kubectl logs).
        self.sshd = subprocess.Popen([self.sshd_bin, "-D", "-e", "-f", self.sshd_config], stdin=subprocess.DEVNULL)

    def wait_listening(self, timeout_s: float = 30.0) -> None:
        """sshd writes its PidFile once its listening socket is bound; then the pod is ready."""
        assert self.sshd is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sshd.poll() is not None:
                raise WorkerError(f"sshd exited with status {self.sshd.returncode} at start; see its lines above")
            if self.pid_file is None or Path(self.pid_file).exists():
                break
            time.sleep(0.05)
        ready_file(self.runtime).touch()
        self.say("sshd is listening; ready for ranks")

    def ranks(self) -> list[int]:
        return [pid for pid in children_of(os.getpid()) if is_rank(pid)]

    def on_signal(self, signum: int, _frame: object) -> None:
        self.received = signum
        self.stopping.set()

    def shut_down(self, signum: int) -> None:
        """Forward the signal to the ranks, wait for them within the grace period, stop sshd."""
        began = time.monotonic()
        ranks = self.ranks()
        name = signal.Signals(signum).name
        self.say(f"{name}: forwarding to {len(ranks)} rank(s) on this pod, waiting up to {self.grace_s:.0f}s")
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        while time.monotonic() - began < self.grace_s:
            self.reap()
            self.relay.poll()
            alive = [pid for pid in ranks if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            if not alive:
                break
            time.sleep(RELAY_POLL_S)
        else:
            self.say(f"ranks still running after {self.grace_s:.0f}s; stopping anyway")
        self.say(f"ranks done after {time.monotonic() - began:.1f}s; stopping sshd")
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.sshd.kill()

    def reap(self) -> None:
        """Collect exited orphans re-parented to PID 1 (sshd's own status stays with Popen)."""
        if os.getpid() != 1:
            return
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None or (self.sshd is not None and found.si_pid == self.sshd.pid):
                return
            try:
                os.waitpid(found.si_pid, os.WNOHANG)
            except ChildProcessError:
                return

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.prepare()
        self.start_sshd()
        self.wait_listening()
        assert self.sshd is not None
        while not self.stopping.is_set():
            self.reap()
            self.relay.poll()
            if self.sshd.poll() is not None:
                ready_file(self.runtime).unlink(missing_ok=True)
                self.relay.finish()
                self.say(f"sshd exited with status {self.sshd.returncode}")
                return self.sshd.returncode or 1
            self.stopping.wait(RELAY_POLL_S)
        self.shut_down(self.received)
        self.relay.finish()
        ready_file(self.runtime).unlink(missing_ok=True)
        return 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
