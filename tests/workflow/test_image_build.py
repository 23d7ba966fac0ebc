"""The CPU image, built here from the Dockerfile with podman, and run.

`scripts/build_image.sh` builds it as a developer does (the Debian base made locally when podman
lacks it; pip's CA bundle and wheel folder from `pip config list`). With the layer cache a build
takes seconds, so the suite always checks the image of the working tree: what it installs, the user
it runs as, that it carries no host key, that its sshd config is valid for that user, that a
worker started as the chart starts it accepts the MPI Operator's key over a pod DNS name, and that
a code change rebuilds none of the heavy layers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
TAG = os.environ.get("PIPELORA_TEST_IMAGE", "localhost/pipelora-k8s:dev-cpu")
BUILD_TIMEOUT_S = 1800
HOME = "/home/mpiuser"


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def build(context: Path, tag: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP": str(Path(sys.executable).parent / "pip")}
    proc = subprocess.run(
        [str(context / "scripts" / "build_image.sh"), tag],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, f"the image did not build:\n{proc.stderr[-6000:]}"
    assert proc.stdout.strip().splitlines()[-1] == tag
    return proc


@pytest.fixture(scope="module")
def image() -> str:
    if not shutil.which("podman"):
        pytest.fail("podman is not installed: `make setup` installs it (make containers)")
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    if info.returncode != 0:
        pytest.fail(f"podman cannot run here: {info.stderr.strip()[-1000:]}; `make containers` configures it")
    build(REPO, TAG)
    return TAG


def run(image: str, *args: str, user: str | None = None, entrypoint: str | None = None) -> str:
    argv = ["run", "--rm"]
    if user is not None:
        argv += ["--user", user]
    if entrypoint is not None:
        argv += ["--entrypoint", entrypoint]
    return podman(*argv, image, *args).stdout


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert match, name
    return match.group(1)


def test_cli_runs_as_uid_1000(image: str) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert run(image, "--version").strip() == f"pipelora-k8s, version {version}"
    assert run(image, "-u", entrypoint="id").strip() == "1000"


def test_image_installs_the_pinned_training_stack(image: str) -> None:
    code = (
        "import torch, deepspeed, transformers, peft, sys;"
        "print(sys.version_info[:2], torch.__version__, deepspeed.__version__,"
        " transformers.__version__, peft.__version__)"
    )
    out = run(image, "-c", code, entrypoint="python").split()
    versions = out[-4:]
    assert versions == [
        f"{dockerfile_arg('TORCH_VERSION')}+cpu",
        dockerfile_arg("DEEPSPEED_VERSION"),
        dockerfile_arg("TRANSFORMERS_VERSION"),
        dockerfile_arg("PEFT_VERSION"),
    ]
    assert " ".join(out[:2]) == "(3, 11)"  # Debian bookworm's Python: the cp311 torch wheel


def test_image_carries_no_host_key(image: str) -> None:
    found = run(image, "/", "-xdev", "-name", "ssh_host_*key*", user="0", entrypoint="find")
    assert found.strip() == ""


def test_sshd_folder_is_private_to_uid_1000(image: str) -> None:
    out = run(image, "-c", "%u:%g %a %n", f"{HOME}/.sshd", f"{HOME}/.sshd/sshd_config", entrypoint="stat")
    assert out.splitlines() == [f"1000:1000 700 {HOME}/.sshd", f"1000:1000 600 {HOME}/.sshd/sshd_config"]


def test_sshd_config_is_valid_for_uid_1000_once_keys_exist(image: str) -> None:
    script = (
        "set -e; cd ~/.sshd;"
        " for kind in ed25519 ecdsa; do ssh-keygen -q -t $kind -N '' -f ssh_host_${kind}_key; done;"
        " /usr/sbin/sshd -t -f ~/.sshd/sshd_config && echo config-ok"
    )
    proc = podman("run", "--rm", "--user", "1000", "--entrypoint", "bash", image, "-c", script, check=False)
    assert proc.returncode == 0 and "config-ok" in proc.stdout, proc.stderr


@pytest.fixture
def network() -> Iterator[str]:
    name = f"pipelora-image-{uuid.uuid4().hex[:8]}"
    podman("network", "create", name)
    try:
        yield name
    finally:
        podman("network", "rm", "-f", name, check=False)


def test_worker_accepts_the_operator_key_over_a_pod_dns_name(
    image: str, network: str, tmp_path: Path
) -> None:
    """Two workers started as the chart starts them (`pipelora-k8s worker`, uid 1000); a launcher-like
    container logs in by the operator's DNS name with the operator's Secret mounted over ~/.ssh."""
    keys = tmp_path / "ssh"
    keys.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(keys / "id_rsa")], check=True)
    shutil.copy(keys / "id_rsa.pub", keys / "authorized_keys")
    keys.chmod(0o755)
    for path in keys.iterdir():
        path.chmod(0o644)  # root-owned 0644: how the operator's Secret is mounted
    tmp_path.chmod(0o755)
    mount = f"{keys}:{HOME}/.ssh:ro"
    names = []
    try:
        for i in range(2):
            name = f"{network}-worker-{i}"
            names.append(name)
            podman(
                "run", "-d", "--name", name, "--network", network,
                "--network-alias", f"demo-worker-{i}.demo", "-v", mount, image, "worker", "--grace-seconds", "5",
            )  # fmt: skip
        login = "for i in $(seq 50); do ssh demo-worker-0.demo 'echo $PATH; pipelora-k8s --version' && exit 0; sleep 0.2; done; exit 1"
        proc = podman(
            "run", "--rm", "--network", network, "-v", mount, "--entrypoint", "bash", image, "-c", login,
            check=False, timeout=120,
        )  # fmt: skip
        worker_log = podman("logs", names[0], check=False)
        logs = worker_log.stdout + worker_log.stderr
        assert proc.returncode == 0, proc.stderr + logs
        path, version = proc.stdout.strip().splitlines()[-2:]
        assert path.startswith("/opt/venv/bin:") and version.startswith("pipelora-k8s, version ")
        scan = (
            'for i in $(seq 50); do ssh-keyscan -p 2222 -t ed25519 "$0" 2>/dev/null | grep -q . && '
            'exec ssh-keyscan -p 2222 -t ed25519 "$0" 2>/dev/null; sleep 0.2; done; exit 1'
        )
        keys_seen = [
            podman(
                "run", "--rm", "--network", network, "--entrypoint", "bash", image, "-c", scan, f"demo-worker-{i}.demo",
                timeout=120,
            ).stdout.split()[-1]
            for i in range(2)
        ]  # fmt: skip
        assert keys_seen[0] != keys_seen[1], "each worker generates its own host keys at start"
    finally:
        for name in names:
            podman("rm", "-f", "-t", "0", name, check=False)


def test_a_code_change_rebuilds_none_of_the_heavy_layers(image: str, tmp_path: Path) -> None:
    """The working tree with one file of workflow/ changed: every layer up to the dependencies'
    install comes from the cache; only the wheel and its install are rebuilt."""
    context = tmp_path / "context"
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listing):
        if (REPO / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, context / name)
    cli = context / "workflow" / "cli.py"
    cli.write_text(cli.read_text() + f"\n# {uuid.uuid4().hex}\n")
    tag = f"localhost/pipelora-k8s:cache-probe-{uuid.uuid4().hex[:8]}"
    try:
        log = build(context, tag).stderr
    finally:
        podman("rmi", "-f", tag, check=False)
    steps = re.findall(r"^\[\d+/\d+\] STEP \d+/\d+: (.*?)\n(?:--> )?(Using cache)?", log, re.M)
    rebuilt = [step for step, cached in steps if not cached and not step.startswith(("FROM", "ARG", "ENV", "SHELL",
               "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"))]  # fmt: skip
    assert rebuilt, log[-3000:]
    heavy = ("apt-get install", "torch==", "deepspeed==", "-r /tmp/requirements.txt", "useradd")
    assert not [step for step in rebuilt if any(word in step for word in heavy)], rebuilt
    assert any(step.startswith("COPY workflow/") for step in rebuilt)
    assert any("pipelora_k8s-*.whl" in step for step in rebuilt)
