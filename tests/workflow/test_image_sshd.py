"""The image's sshd and ssh client configuration, run for real outside a container.

The configs are taken verbatim from the Dockerfile's heredocs; only the home folder, the port
and the user name are moved to this machine. sshd runs unprivileged, as in a worker pod, with
the key files the MPI Operator's Secret would mount, and a client logs in the way mpirun does:
the login must succeed without host-key prompts and the session must see the image's PATH.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOME = "/home/mpiuser"
SSHD_CONFIG = f"{HOME}/.sshd/sshd_config"
CLIENT_CONFIG = "/etc/ssh/ssh_config.d/50-pipelora.conf"


def heredoc(dest: str) -> str:
    text = (REPO / "Dockerfile").read_text()
    match = re.search(rf"^COPY [^\n]*<<'?(\w+)'? {re.escape(dest)}\n(.*?)\n\1\n", text, re.S | re.M)
    assert match, f"the Dockerfile writes no {dest} with a heredoc COPY"
    return match.group(2) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sshd_binary() -> str:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if not found or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip(
            "openssh-server and openssh-client are not installed here (the GitHub test workflow installs them)"
        )
    if os.geteuid() == 0:
        pytest.skip("the image runs sshd as a non-root user; as root sshd would not run that configuration")
    return found


def keygen(path: Path, kind: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="module")
def worker(
    tmp_path_factory: pytest.TempPathFactory, wait_for_port: Callable[..., bool]
) -> Iterator[dict[str, object]]:
    """sshd started like the worker container, on a free port, with a Secret-like ~/.ssh."""
    sshd = sshd_binary()
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    user = getpass.getuser()
    (home / ".sshd").mkdir(mode=0o700)
    secret = home / ".ssh"
    secret.mkdir(mode=0o700)
    config = heredoc(SSHD_CONFIG).replace(HOME, str(home))
    config = re.sub(r"^Port \d+$", f"Port {port}", config, flags=re.M)
    config = re.sub(r"^AllowUsers \S+$", f"AllowUsers {user}", config, flags=re.M)
    (home / ".sshd" / "sshd_config").write_text(config)
    for path in re.findall(r"^HostKey (\S+)$", config, re.M):
        if path.startswith(str(home / ".sshd")):
            kind = re.search(r"ssh_host_(\w+)_key", path).group(1)
            keygen(Path(path), kind)
    # The operator's Secret: an ECDSA key under the name id_rsa, and its public half as authorized_keys.
    keygen(secret / "id_rsa", "ecdsa")
    shutil.copy(secret / "id_rsa.pub", secret / "authorized_keys")
    client = home / "ssh_config"
    client.write_text(re.sub(r"^(\s*)Port \d+$", rf"\g<1>Port {port}", heredoc(CLIENT_CONFIG), flags=re.M))

    check = subprocess.run(
        [sshd, "-t", "-f", str(home / ".sshd" / "sshd_config")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    log = home / "sshd.log"
    with log.open("a") as out:  # append, like the pipe of a container's PID 1: writers do not overwrite
        proc = subprocess.Popen(
            [sshd, "-De", "-f", str(home / ".sshd" / "sshd_config")], stdout=out, stderr=out
        )
    try:
        if not wait_for_port(port, proc, timeout=30):
            pytest.fail(f"sshd did not start: {log.read_text()}")
        yield {
            "home": home,
            "client": client,
            "key": secret / "id_rsa",
            "config": config,
            "log": log,
            "pid": proc.pid,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def ssh(worker: dict[str, object], command: str) -> subprocess.CompletedProcess[str]:
    argv = [
        "ssh",
        "-F",
        str(worker["client"]),
        "-i",
        str(worker["key"]),
        "-o",
        "BatchMode=yes",
        "127.0.0.1",
        command,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_login_with_the_secret_key_needs_no_host_key_prompt(worker: dict[str, object]) -> None:
    proc = ssh(worker, "id -u")
    assert proc.returncode == 0, proc.stderr + Path(str(worker["log"])).read_text()
    assert proc.stdout.strip() == str(os.getuid())
    assert "Warning" not in proc.stderr  # LogLevel ERROR: nothing mixed into the ranks' output


def test_session_sees_the_image_path(worker: dict[str, object]) -> None:
    expected = re.search(r"^SetEnv .*?PATH=(\S+)", str(worker["config"]), re.M).group(1)
    proc = ssh(worker, "echo $PATH")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    assert expected.startswith("/opt/venv/bin:")


def test_session_can_write_to_the_sshd_output(worker: dict[str, object]) -> None:
    """The chart's PIPELORA_MIRROR_LOG=/proc/1/fd/1: ranks started over ssh write into the output of
    sshd (the worker container's PID 1), so `kubectl logs` on a worker shows its stages."""
    line = "[stage 1/2 dp 0/1] step 1/1 loss 1.000"
    proc = ssh(worker, f"echo '{line}' >> /proc/{worker['pid']}/fd/1")
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 10
    while line not in Path(str(worker["log"])).read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line in Path(str(worker["log"])).read_text()
