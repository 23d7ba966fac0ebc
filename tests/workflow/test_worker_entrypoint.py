"""The worker entrypoint as a process: the image's sshd_config run for real, as a non-root user.

On a root machine (CI containers) the tests create an unprivileged user and run the entrypoint
and sshd as that user, as the chart runs them as uid 1000; elsewhere they run as the current
user. A client logs in with an operator-style key the way mpirun does.
"""

from __future__ import annotations

import getpass
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from net import free_port

from pipelora.launch import RELAY_DIR_ENV, RUNTIME_DIR_ENV, pod_env_file, rank_relay_dir, ready_file
from pipelora.workflow.worker import LineRelay, generate_host_keys

REPO = Path(__file__).resolve().parents[2]
IMAGE_SSHD_CONFIG = REPO / "image" / "sshd_config"
IMAGE_HOME = "/home/mpiuser"
TEST_USER = "pipelora-ci"


def require_sshd() -> str:
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if not sshd or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.fail("openssh-server and openssh-client are missing: `make setup` installs them")
    return sshd


@dataclass
class Account:
    """Who runs sshd and the entrypoint, and how that user starts `pipelora-k8s`."""

    user: str
    uid: int
    gid: int
    home: Path
    cli: list[str]  # argv prefix that runs pipelora-k8s as this user
    python: str

    def popen_user(self) -> dict[str, object]:
        """Popen arguments that start a process as this user (signals then reach it directly)."""
        if os.geteuid() != 0:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "cwd": str(self.home)}


@pytest.fixture(scope="module")
def account(tmp_path_factory: pytest.TempPathFactory) -> Account:
    """The current user, or on a root machine a created unprivileged one."""
    if os.geteuid() != 0:
        entry = pwd.getpwnam(getpass.getuser())
        return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, tmp_path_factory.mktemp("home"),
                       [sys.executable, "-m", "pipelora.workflow.cli"], sys.executable)
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", TEST_USER], check=True)
        entry = pwd.getpwnam(TEST_USER)
    # This venv's interpreter may sit where an unprivileged user cannot reach it (under /root): run
    # the project with the system's Python of the same version over this venv's site-packages.
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system_python = shutil.which(version, path="/usr/bin:/usr/local/bin")
    if system_python is None:
        pytest.fail(f"running sshd as a non-root user needs /usr/bin/{version} (the venv's Python version)")
    site = sysconfig.get_paths()["purelib"]
    home = Path(entry.pw_dir) / "pipelora-test"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    bootstrap = f"import site, sys; site.addsitedir({site!r}); sys.argv[0] = 'pipelora-k8s'; " \
                "from pipelora.workflow.cli import main; main()"
    wrapper = home / "bin" / "pipelora-k8s"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {system_python} -c \"{bootstrap}\" \"$@\"\n")
    wrapper.chmod(0o755)
    subprocess.run(["chown", "-R", f"{entry.pw_uid}:{entry.pw_gid}", str(home)], check=True)
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, home, [str(wrapper)], system_python)


@dataclass
class Pod:
    """A worker "pod" on this machine: the image's sshd config moved to a scratch home and port."""

    account: Account
    home: Path
    runtime: Path
    port: int
    key: Path
    config: Path
    proc: subprocess.Popen[str] | None = None
    lines: list[str] | None = None

    def start(self, env: dict[str, str], *, grace_s: float = 20.0) -> None:
        self.lines = []
        assert not ready_file(self.runtime).exists(), "the entrypoint leaves no ready file behind"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "NCCL_", "HF_", "PIPELORA_"))}
        environ.update(env)
        environ[RUNTIME_DIR_ENV] = str(self.runtime)
        environ["HOME"] = str(self.account.home)
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            [*self.account.cli, "worker", "--sshd-config", str(self.config),
             "--sshd", require_sshd(), "--grace-seconds", str(grace_s)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ, **self.account.popen_user())
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 30
        while not ready_file(self.runtime).exists():
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, "worker never became ready:\n" + "".join(self.lines)
            time.sleep(0.05)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self.lines is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the pump thread drains the pipe
        return code

    def ssh(self, command: str, **kwargs: object) -> subprocess.Popen[str]:
        """Log in as mpirun does (the operator's key, no host-key checks) and run `command`."""
        return subprocess.Popen(
            ["ssh", "-i", str(self.key), "-p", str(self.port), "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
             f"{self.account.user}@127.0.0.1", command],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]

    def host_key(self) -> str:
        return (self.home / ".sshd" / "ssh_host_ed25519_key.pub").read_text().split()[1]

    def output(self) -> str:
        return "".join(self.lines or [])


@pytest.fixture()
def pod(account: Account, tmp_path: Path) -> Iterator[Pod]:
    require_sshd()
    home = account.home / f"pod-{tmp_path.name}"
    shutil.rmtree(home, ignore_errors=True)
    (home / ".sshd").mkdir(parents=True, mode=0o700)
    secret = home / ".ssh"
    secret.mkdir(mode=0o700)
    port = free_port()
    runtime = home / "run"
    bin_dir = Path(account.cli[0]).parent if len(account.cli) == 1 else Path(sys.executable).parent
    config = IMAGE_SSHD_CONFIG.read_text().replace(IMAGE_HOME, str(home))
    config = re.sub(r"^Port \d+$", f"Port {port}\nListenAddress 127.0.0.1", config, flags=re.M)
    config = re.sub(r"^AllowUsers \S+$", f"AllowUsers {account.user}", config, flags=re.M)
    config = re.sub(r"^SetEnv PATH=(\S+)", rf"SetEnv {RUNTIME_DIR_ENV}={runtime} PATH={bin_dir}:\1", config,
                    flags=re.M)
    (home / ".sshd" / "sshd_config").write_text(config)
    # The operator's Secret: an ECDSA key pair named id_rsa, its public half as authorized_keys.
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(secret / "id_rsa")], check=True)
    shutil.copy(secret / "id_rsa.pub", secret / "authorized_keys")
    client_key = tmp_path / "client_key"
    shutil.copy(secret / "id_rsa", client_key)
    client_key.chmod(0o600)
    subprocess.run(["chown", "-R", f"{account.uid}:{account.gid}", str(home)], check=True)
    for path in (secret / "id_rsa", secret / "id_rsa.pub", secret / "authorized_keys"):
        path.chmod(0o644)  # as the operator mounts them (root-owned on a cluster)
    created = Pod(account, home, runtime, port, client_key, home / ".sshd" / "sshd_config")
    yield created
    if created.proc is not None and created.proc.poll() is None:
        created.proc.kill()
        created.proc.wait()


def test_host_keys_are_fresh_at_every_start(pod: Pod) -> None:
    pod.start({})
    first = pod.host_key()
    assert pod.stop() == 0
    pod.start({})
    second = pod.host_key()
    assert pod.stop() == 0
    assert first != second
    assert "host keys generated (ssh_host_ed25519_key, ssh_host_ecdsa_key)" in pod.output()


def test_ranks_started_through_sshd_get_the_pod_environment(pod: Pod) -> None:
    pod.start({
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/pipelora-irsa",
        "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
        "NCCL_SOCKET_IFNAME": "eth0",
        "HF_HUB_ENABLE_HF_TRANSFER": "1",
        "PIPELORA_POD_ENV_NAMES": "EXTRA_SETTING",
        "EXTRA_SETTING": "from-the-chart",
        "UNLISTED_SETTING": "stays-in-the-pod",
    })
    # A variable mpirun passed explicitly (-x) wins over the pod's recorded value.
    session = pod.ssh("env NCCL_SOCKET_IFNAME=ib0 pipelora-k8s pod-env")
    out, err = session.communicate(timeout=60)
    assert session.returncode == 0, err
    shown = {m[0]: (m[1], m[2]) for m in re.findall(r"^(\w+)=(\S+)\s+\((pod|own)\)$", out, re.M)}
    assert shown["AWS_ROLE_ARN"] == ("arn:aws:iam::123456789012:role/pipelora-irsa", "pod")
    assert shown["AWS_WEB_IDENTITY_TOKEN_FILE"][1] == "pod"
    assert shown["AWS_CONTAINER_CREDENTIALS_FULL_URI"][1] == "pod"
    assert shown["HF_HUB_ENABLE_HF_TRANSFER"] == ("1", "pod")
    assert shown["EXTRA_SETTING"] == ("from-the-chart", "pod")
    assert shown["NCCL_SOCKET_IFNAME"] == ("ib0", "own")
    assert "UNLISTED_SETTING" not in out
    assert oct(pod_env_file(pod.runtime).stat().st_mode & 0o777) == "0o600"
    assert pod.stop() == 0


RANK_SCRIPT = """
import signal, sys, time
from pipelora.rankrelay import relay_from_env
relay = relay_from_env(int(sys.argv[1]))
count = int(sys.argv[2])
for i in range(count):
    relay.write(f"[stage 1/1 dp 0/1] line {i:06d}")
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(time.monotonic()))
relay.write("rank waiting")
while not stop:
    time.sleep(0.01)
time.sleep(0.5)  # a checkpoint at the next step boundary
relay.write("preempted at step 7, checkpoint committed")
"""


def test_sigterm_reaches_the_ranks_and_the_entrypoint_exits_after_them(pod: Pod, tmp_path: Path) -> None:
    pod.start({}, grace_s=30)
    script = pod.home / "rank.py"
    script.write_text(RANK_SCRIPT)
    os.chown(script, pod.account.uid, pod.account.gid)
    count = 20000  # written as fast as the rank can: every line must arrive, in order
    python = pod.account.python if os.geteuid() == 0 else sys.executable
    site = sysconfig.get_paths()["purelib"]
    session = pod.ssh(
        f"env OMPI_COMM_WORLD_RANK=0 {RELAY_DIR_ENV}={rank_relay_dir(pod.runtime)} "
        f"{python} -c \"import site; site.addsitedir('{site}'); exec(open('{script}').read())\" 0 {count}")
    deadline = time.monotonic() + 60
    while "rank waiting" not in pod.output():
        assert session.poll() is None, session.communicate()
        assert time.monotonic() < deadline, pod.output()
        time.sleep(0.05)
    assert pod.stop() == 0
    session.communicate(timeout=30)
    out = pod.output()
    relayed = re.findall(r"line (\d{6})", out)
    assert relayed == [f"{i:06d}" for i in range(count)]
    assert "forwarding to 1 rank(s)" in out
    # the rank's last words arrive before the entrypoint stops sshd and exits
    assert out.index("preempted at step 7, checkpoint committed") < out.index("stopping sshd")


def test_line_relay_keeps_partial_lines_until_complete(tmp_path: Path) -> None:
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        relay = LineRelay(tmp_path, out)
        log = tmp_path / "rank-00000.log"
        with open(log, "a") as fh:
            fh.write("first\nsec")
        assert relay.poll() == 1
        with open(log, "a") as fh:
            fh.write("ond\nthird")
        assert relay.poll() == 1
        relay.finish()
    assert out_path.read_text() == "first\nsecond\nthird\n"


def test_only_host_key_files_are_generated(tmp_path: Path) -> None:
    config = (f"HostKey {tmp_path}/ssh_host_ed25519_key\nHostKey {tmp_path}/secret/id_rsa\n"
              f"hostkey {tmp_path}/ssh_host_ecdsa_key\n")
    made = generate_host_keys(config)
    assert [p.name for p in made] == ["ssh_host_ed25519_key", "ssh_host_ecdsa_key"]
    assert not (tmp_path / "secret").exists()
