"""What builds the image here and what CI pins around it: the containers.conf settings, the
Makefile's container set-up, the local build script's use of pip's settings, the Debian base
script, and the MPI Operator release the kind workflow installs.

The scripts run for real; where they would call podman or apt, a recording stand-in takes the call
(test_image_build.py runs the real build).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "scripts" / "containers_conf.py"


def conf(path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CONF), "--path", str(path), *flags], capture_output=True, text=True, check=False
    )


def settings_of(text: str) -> dict[tuple[str, str], str]:
    doc = tomllib.loads(text)
    return {
        ("containers", "default_ulimits"): repr(doc.get("containers", {}).get("default_ulimits")),
        ("engine", "runtime"): repr(doc.get("engine", {}).get("runtime")),
    }


@pytest.mark.parametrize(
    "before",
    [
        "",
        '[containers]\nlog_driver = "k8s-file"\n\n[network]\nnetwork_backend = "netavark"\n',
        '[containers]\ndefault_ulimits = [\n  "nofile=1024:1024",\n]\nlog_size_max = -1\n[engine]\nruntime = "crun"\n',
        '[engine]\n# the runtime\nruntime="crun"  # fast\nevents_logger = "file"\n',
    ],
)
def test_containers_conf_gets_both_settings_and_keeps_the_rest(tmp_path: Path, before: str) -> None:
    path = tmp_path / "containers.conf"
    if before:
        path.write_text(before)
    assert conf(path, "--check").returncode == 1
    assert conf(path).returncode == 0
    after = path.read_text()
    assert settings_of(after) == {("containers", "default_ulimits"): "[]", ("engine", "runtime"): "'runc'"}
    old, new = (tomllib.loads(before), tomllib.loads(after))
    for section, keys in old.items():
        for key, value in keys.items():
            if (section, key) not in {("containers", "default_ulimits"), ("engine", "runtime")}:
                assert new[section][key] == value
    assert conf(path, "--check").returncode == 0
    stamp = path.stat().st_mtime_ns
    assert conf(path).returncode == 0 and path.read_text() == after and path.stat().st_mtime_ns == stamp


def fake_bin(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_make_containers_installs_only_what_is_missing(tmp_path: Path) -> None:
    argv = ["make", "--no-print-directory", "-C", str(REPO), "containers", "SUDO=echo"]
    missing = subprocess.run(
        [*argv, "CONTAINER_TOOLS=sh:present-package /nonexistent/tool:missing-package"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert missing.returncode == 0, missing.stderr
    install = [line for line in missing.stdout.splitlines() if "apt-get install" in line]
    assert install and install[0].split()[-1] == "missing-package" and "present-package" not in install[0]
    assert "--no-install-recommends" in install[0]
    present = subprocess.run([*argv, "CONTAINER_TOOLS=sh:present-package"], capture_output=True, text=True)
    assert "apt-get" not in present.stdout


def test_make_setup_sets_up_containers() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^setup:.*\bcontainers\b", makefile, re.M)
    tools = re.search(r"^CONTAINER_TOOLS :=((?:.*\\\n)*.*)$", makefile, re.M).group(1)
    packages = {entry.rsplit(":", 1)[1] for entry in tools.replace("\\\n", " ").split()}
    assert {
        "podman",
        "runc",
        "debootstrap",
        "openssh-server",
        "netavark",
        "aardvark-dns",
        "iptables",
    } <= packages


def test_build_script_passes_pip_settings_as_mounts_and_build_args(tmp_path: Path) -> None:
    """Only the CA bundle and the wheel folders travel, mounted read-only, named by build args."""
    cert = tmp_path / "ca bundle.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    wheels, more = tmp_path / "wheels", tmp_path / "more-wheels"
    wheels.mkdir()
    more.mkdir()
    bin_dir = tmp_path / "bin"
    record = tmp_path / "podman-args"
    fake_bin(bin_dir, "podman", f'printf "%s\\n" "$@" >> "{record}"\n')
    fake_bin(
        bin_dir,
        "fake-pip",
        f"""echo "global.cert='/nonexistent/ca.crt'"
echo ":env:.cert='{cert}'"
echo "global.find-links='{wheels} file://{more} https://example.invalid/wheels'"
echo "global.extra-index-url='file:///somewhere/simple'"
""",
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PIP": str(bin_dir / "fake-pip")}
    proc = subprocess.run(
        [str(REPO / "scripts" / "build_image.sh"), "localhost/pipelora-k8s:probe"],
        cwd=tmp_path, capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "localhost/pipelora-k8s:probe"
    args = record.read_text().splitlines()
    build = args[args.index("build") :]
    pairs = list(zip(build[:-1], build[1:], strict=True))
    assert ("--format", "docker") in pairs and "--pull=never" in build
    assert ("-v", f"{cert}:/etc/ssl/host-ca.crt:ro") in pairs
    assert ("--build-arg", "PIP_CERT=/etc/ssl/host-ca.crt") in pairs
    assert ("-v", f"{wheels}:{wheels}:ro") in pairs and ("-v", f"{more}:{more}:ro") in pairs
    assert ("--build-arg", f"PIP_FIND_LINKS={wheels} {more}") in pairs
    assert ("--build-arg", "VARIANT=cpu") in pairs and ("-t", "localhost/pipelora-k8s:probe") in pairs
    assert not [a for a in build if "extra-index" in a or "somewhere" in a or "example.invalid" in a]
    # The Debian base is asked for first (made by scripts/base_image.sh when missing).
    assert args[:3] == ["image", "exists", "debian:bookworm-slim"]


def test_build_script_without_pip_settings_builds_plain(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    record = tmp_path / "podman-args"
    fake_bin(bin_dir, "podman", f'printf "%s\\n" "$@" >> "{record}"\n')
    fake_bin(bin_dir, "fake-pip", "exit 0\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PIP": str(bin_dir / "fake-pip")}
    proc = subprocess.run(
        [str(REPO / "scripts" / "build_image.sh")], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "localhost/pipelora-k8s:dev-cpu"
    build = record.read_text().splitlines()
    assert "-v" not in build and not [a for a in build if a.startswith("PIP_")]


def test_base_script_takes_only_debian_slim_tags_and_reuses_an_existing_base(tmp_path: Path) -> None:
    script = str(REPO / "scripts" / "base_image.sh")
    bin_dir = tmp_path / "bin"
    record = tmp_path / "podman-args"
    fake_bin(bin_dir, "podman", f'printf "%s\\n" "$*" >> "{record}"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    wrong = subprocess.run([script, "python:3.11-slim"], capture_output=True, text=True, env=env)
    assert wrong.returncode == 2 and "debian:<suite>-slim" in wrong.stderr
    reuse = subprocess.run([script, "debian:trixie-slim"], capture_output=True, text=True, env=env)
    assert reuse.returncode == 0 and reuse.stdout.strip() == "debian:trixie-slim"
    assert record.read_text().splitlines() == ["image exists debian:trixie-slim"]  # no debootstrap, no import


def test_kind_workflow_pins_a_released_mpi_operator() -> None:
    """The operator's deploy manifest at a release tag and that release's image: never `master`."""
    text = (REPO / ".github" / "workflows" / "e2e-kind.yml").read_text()
    workflow = yaml.safe_load(text)
    env = workflow["env"]
    version = env["MPI_OPERATOR_VERSION"]
    assert re.fullmatch(r"v\d+\.\d+\.\d+", version)
    assert version == "v0.8.2"  # the release whose controller the chart's lifecycle follows
    assert env["MPI_OPERATOR_IMAGE"] == f"mpioperator/mpi-operator:{version[1:]}"
    assert "master" not in text
    (install,) = [
        step["run"] for step in workflow["jobs"]["e2e"]["steps"] if "mpi-operator.yaml" in step.get("run", "")
    ]
    manifest = "/kubeflow/mpi-operator/${MPI_OPERATOR_VERSION}/deploy/v2beta1/mpi-operator.yaml"
    assert f"https://raw.githubusercontent.com{manifest}" in install
    assert 'deployment/mpi-operator "mpi-operator=${MPI_OPERATOR_IMAGE}"' in install
    assert install.index("set image") < install.index("rollout status")
