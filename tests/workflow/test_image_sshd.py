"""The image's sshd and ssh client configuration, run for real outside a container.

The configs are the very files the image ships (image/sshd_config, image/ssh_config); only the
home folder, the port and the user name are moved to this machine. sshd runs unprivileged, as in a
worker pod (on a machine where the tests run as root, as a non-root user made for the purpose),
with fresh host keys where the config names them and the key files the MPI Operator's Secret
would mount; a client logs in the way mpirun does: the login must succeed without host-key
prompts and the session must see the image's PATH.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from net import free_port

REPO = Path(__file__).resolve().parents[2]
HOME = "/home/mpiuser"
SSHD_CONFIG = REPO / "image" / "sshd_config"
CLIENT_CONFIG = REPO / "image" / "ssh_config"
# The unprivileged user sshd runs as where the tests run as root.
SSHD_USER = "pipelora-ci"  # the same user the worker entrypoint tests use


def sshd_binary() -> str:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if not found or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.fail("openssh-server and openssh-client are not installed here: `make setup` installs them")
    return found


def sshd_account() -> pwd.struct_passwd:
    """Who sshd runs as: this user, or (as root) an unprivileged user made once for these tests."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(SSHD_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        proc = subprocess.run(
            [useradd, "--create-home", "--shell", "/bin/bash", SSHD_USER], capture_output=True, text=True
        )
        if proc.returncode != 0 and "already exists" not in proc.stderr:
            pytest.fail(f"cannot create the user {SSHD_USER} to run sshd as: {proc.stderr.strip()}")
        return pwd.getpwnam(SSHD_USER)


def keygen(path: Path, kind: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)


def give(path: Path, account: pwd.struct_passwd) -> None:
    if os.geteuid() == 0:
        os.chown(path, account.pw_uid, account.pw_gid)


@pytest.fixture(scope="module")
def worker(wait_for_port: Callable[..., bool]) -> Iterator[dict[str, object]]:
    """sshd started like the worker container, on a free port, with a Secret-like ~/.ssh."""
    sshd = sshd_binary()
    account = sshd_account()
    # Outside pytest's per-user temporary folder, which another user cannot enter.
    home = Path(tempfile.mkdtemp(prefix="pipelora-sshd-"))
    home.chmod(0o755)
    give(home, account)
    port = free_port()
    own = home / ".sshd"
    own.mkdir(mode=0o700)
    config = SSHD_CONFIG.read_text().replace(HOME, str(home))
    config = re.sub(r"^Port \d+$", f"Port {port}", config, flags=re.M)
    config = re.sub(r"^AllowUsers \S+$", f"AllowUsers {account.pw_name}", config, flags=re.M)
    (own / "sshd_config").write_text(config)
    # What the worker entrypoint does at start: a fresh key for each ~/.sshd host key of the config.
    for path in re.findall(r"^HostKey (\S+)$", config, re.M):
        if path.startswith(str(own)):
            keygen(Path(path), re.search(r"ssh_host_(\w+)_key", path).group(1))
    for path in [own, *own.iterdir()]:
        give(path, account)
    # The operator's Secret: an ECDSA key under the name id_rsa and its public half as
    # authorized_keys, mounted root-owned and world-readable (hence StrictModes no).
    secret = home / ".ssh"
    secret.mkdir(mode=0o755)
    keygen(secret / "id_rsa", "ecdsa")
    shutil.copy(secret / "id_rsa.pub", secret / "authorized_keys")
    client_key = home / "client_key"  # the launcher's ssh wants its key private to its user
    shutil.copy(secret / "id_rsa", client_key)
    client_key.chmod(0o600)
    if os.geteuid() == 0:
        for path in secret.iterdir():
            path.chmod(0o644)
    client = home / "ssh_config"
    client.write_text(re.sub(r"^(\s*)Port \d+$", rf"\g<1>Port {port}", CLIENT_CONFIG.read_text(), flags=re.M))

    as_account: dict[str, object] = {}
    if os.geteuid() == 0:
        as_account = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    check = subprocess.run(
        [sshd, "-t", "-f", str(own / "sshd_config")], capture_output=True, text=True, **as_account
    )
    assert check.returncode == 0, check.stderr
    log = home / "sshd.log"
    with log.open("a") as out:
        proc = subprocess.Popen(
            [sshd, "-De", "-f", str(own / "sshd_config")], stdout=out, stderr=out, **as_account
        )
    try:
        if not wait_for_port(port, proc, timeout=30):
            pytest.fail(f"sshd did not start: {log.read_text()}")
        yield {
            "home": home,
            "client": client,
            "key": client_key,
            "config": config,
            "log": log,
            "account": account,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def ssh(worker: dict[str, object], command: str) -> subprocess.CompletedProcess[str]:
    account = worker["account"]
    assert isinstance(account, pwd.struct_passwd)
    argv = [
        "ssh",
        "-F",
        str(worker["client"]),
        "-i",
        str(worker["key"]),
        "-o",
        "BatchMode=yes",
        "-l",
        account.pw_name,
        "127.0.0.1",
        command,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_sshd_runs_unprivileged(worker: dict[str, object]) -> None:
    account = worker["account"]
    assert isinstance(account, pwd.struct_passwd) and account.pw_uid != 0


def test_login_with_the_secret_key_needs_no_host_key_prompt(worker: dict[str, object]) -> None:
    proc = ssh(worker, "id -u")
    assert proc.returncode == 0, proc.stderr + Path(str(worker["log"])).read_text()
    account = worker["account"]
    assert isinstance(account, pwd.struct_passwd)
    assert proc.stdout.strip() == str(account.pw_uid)
    assert "Warning" not in proc.stderr  # LogLevel ERROR: nothing mixed into the ranks' output


def test_session_sees_the_image_path(worker: dict[str, object]) -> None:
    expected = re.search(r"^SetEnv .*?PATH=(\S+)", str(worker["config"]), re.M).group(1)
    proc = ssh(worker, "echo $PATH")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    assert expected.startswith("/opt/venv/bin:")


def test_sshd_refuses_a_key_that_is_not_authorized(worker: dict[str, object], tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    keygen(stranger, "ed25519")
    proc = subprocess.run(
        [
            "ssh", "-F", str(worker["client"]), "-i", str(stranger), "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-l", worker["account"].pw_name, "127.0.0.1", "true",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 255
    assert "Permission denied" in proc.stderr
