"""The image contract: the Dockerfile, the files it ships, the chart and the image workflow agree.

Read from what builds the image (test_image_build.py builds and runs it): the chart's rendered
pods start programs the image installs, as the user and on the port the image sets up, with the
Secret mounted where the image's sshd expects it; no host key is baked in; the layers are ordered
so that a code change rebuilds only the project's own; the image workflow pushes exactly the
repository and tags the chart (and the job spec's default) pull.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pipelora"
IMAGE_FILES = REPO / "image"
IMAGE_WORKFLOW = REPO / ".github" / "workflows" / "image.yml"
TEST_WORKFLOW = REPO / ".github" / "workflows" / "test.yml"

# What the image contract (DESIGN.md and the chart) fixes.
USER, UID, GID, HOME = "mpiuser", 1000, 1000, "/home/mpiuser"
SSHD_DIR = f"{HOME}/.sshd"
SSHD_CONFIG = f"{SSHD_DIR}/sshd_config"
SSH_PORT = 2222

# Programs a chart container may start, and the Debian/Ubuntu package of the image that provides each.
PROGRAM_PACKAGES = {"mpirun": "openmpi-bin", "/usr/sbin/sshd": "openssh-server", "sshd": "openssh-server"}
# Programs every Debian and Ubuntu base has (coreutils, bash): fine for probes.
BASE_PROGRAMS = {"test", "cat", "sh", "bash", "/bin/sh", "/bin/bash"}


# ---------------------------------------------------------------------------------------------------
# Reading the Dockerfile


@dataclass
class Instruction:
    stage: str
    keyword: str
    args: str


@dataclass
class Dockerfile:
    instructions: list[Instruction] = field(default_factory=list)
    global_args: dict[str, str] = field(default_factory=dict)

    def of(self, keyword: str, stage: str | None = None) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword and (stage is None or i.stage == stage)]

    def stages(self) -> dict[str, str]:
        """Stage name → its base (FROM argument, global ARG defaults substituted)."""
        out = {}
        for ins in self.of("FROM"):
            base, _, name = ins.args.partition(" AS ")
            base = base.strip()
            if base != "base-${VARIANT}":
                base = re.sub(r"\$\{(\w+)\}", lambda m: self.global_args.get(m.group(1), m.group(0)), base)
            out[name.strip() or base] = base
        return out

    def copied_file(self, dest: str) -> Path:
        """The file of the repository the image ships at `dest` (a plain COPY from the context)."""
        for ins in self.of("COPY"):
            words = [w for w in ins.args.split() if not w.startswith("--")]
            if not ins.args.startswith("--from") and len(words) == 2 and words[1] == dest:
                return REPO / words[0]
        raise AssertionError(f"the Dockerfile copies no file of the repository to {dest}")

    def runs(self) -> list[str]:
        return [i.args for i in self.of("RUN")]


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with continuations joined and comments dropped."""
    result = Dockerfile()
    lines = text.splitlines()
    stage = ""
    n = 0
    while n < len(lines):
        line = lines[n]
        n += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and n < len(lines):
            nxt = lines[n]
            n += 1
            if nxt.lstrip().startswith("#"):
                continue
            line = line[:-1] + " " + nxt.strip()
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stage = name.strip() or base.strip()
        if keyword == "ARG" and not stage:
            key, _, value = args.partition("=")
            result.global_args[key.strip()] = value.strip()
        result.instructions.append(Instruction(stage, keyword, args.strip()))
    return result


def ssh_options(config: str) -> dict[str, list[str]]:
    """An ssh(d) config as keyword (lower case) → every value given for it."""
    options: dict[str, list[str]] = {}
    for line in config.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            options.setdefault(key.lower(), []).append(value.strip())
    return options


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def sshd(dockerfile: Dockerfile) -> dict[str, list[str]]:
    return ssh_options(dockerfile.copied_file(SSHD_CONFIG).read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---------------------------------------------------------------------------------------------------
# Reading the chart


def chart_file(name: str) -> Path:
    path = CHART / name
    if not path.exists():
        pytest.fail(
            f"the chart has no {name} (helm/pipelora/{name}); the image contract is checked against it"
        )
    return path


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(chart_file("values.yaml").read_text())


@pytest.fixture(scope="module")
def chart_meta() -> dict[str, Any]:
    return yaml.safe_load(chart_file("Chart.yaml").read_text())


def job_spec(**cluster_values: Any) -> Any:
    """A small job spec, with `cluster.values` as given (what `submit` and `render` start from)."""
    from pipelora.config import spec_from_dict

    return spec_from_dict(
        {
            "name": "demo",
            "storage": {"uri": "s3://bucket/pipelora"},
            "model": {"uri": "s3://bucket/models/tiny"},
            "dataset": {"uri": "s3://bucket/data/alpaca.json"},
            "parallel": {"stages": 2, "nodes": 2, "gpus_per_node": 1, "micro_batches": 4},
            "cluster": {"values": cluster_values},
        }
    )


def render(**cluster_values: Any) -> list[dict[str, Any]]:
    """The release's objects, rendered as `pipelora-k8s render` does (the chart's values come from code)."""
    from pipelora.workflow import helm
    from pipelora.workflow.values import chart_values

    chart_file("values.yaml")
    spec = job_spec(**cluster_values)
    return [doc for doc in yaml.safe_load_all(helm.template(spec.name, chart_values(spec))) if doc]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render()


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, pod spec) of every pod the chart creates: the dataprep Job's and the MPIJob's."""
    for doc in docs:
        if doc.get("kind") == "Job":
            yield "dataprep", doc["spec"]["template"]["spec"]
        elif doc.get("kind") == "MPIJob":
            for role, replica in doc["spec"]["mpiReplicaSpecs"].items():
                yield role.lower(), replica["template"]["spec"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for role, spec in pod_specs(docs):
        for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            yield f"{role}/{container['name']}", container


def mpijob(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [doc for doc in docs if doc.get("kind") == "MPIJob"]
    assert len(found) == 1, "the chart renders exactly one MPIJob"
    return found[0]


def worker_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = mpijob(docs)["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    (container,) = spec["containers"]
    return container


def pipelora_subcommands(argv: list[str]) -> list[str]:
    """The `pipelora-k8s` subcommand an argv runs, directly or through mpirun."""
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if Path(word).name == "pipelora-k8s"]


# ---------------------------------------------------------------------------------------------------
# The user and sshd


def test_image_user_is_the_numeric_non_root_uid_the_chart_runs_as(
    dockerfile: Dockerfile, values: dict
) -> None:
    users = dockerfile.of("USER", stage="runtime")
    assert users, "the runtime stage sets a USER"
    # Numeric, so that a pod's runAsNonRoot can be verified by the kubelet without a runAsUser.
    assert users[-1].args in {f"{UID}:{GID}", str(UID)}
    useradd = next(r for r in dockerfile.runs() if "useradd" in r)
    for flag in (f"--uid {UID}", f"--gid {GID}", f"--home-dir {HOME}", USER):
        assert flag in useradd
    assert f"groupadd --gid {GID} {USER}" in useradd
    pod = values["podSecurityContext"]
    assert pod.get("runAsUser", UID) == UID
    assert pod.get("runAsGroup", GID) == GID
    assert pod.get("fsGroup", GID) == GID, "the Secret's files must be group-readable by the image user"


def test_sshd_config_lives_outside_the_secret_mount_and_listens_on_the_chart_port(
    sshd: dict[str, list[str]], values: dict, rendered: list[dict]
) -> None:
    mount = mpijob(rendered)["spec"]["sshAuthMountPath"]
    assert mount == values["mpiJob"]["sshAuthMountPath"] == f"{HOME}/.ssh"
    assert not SSHD_DIR.startswith(mount + "/")
    assert sshd["port"] == [str(values["worker"]["sshPort"])] == [str(SSH_PORT)]
    assert sshd["strictmodes"] == ["no"], "the Secret's files are root-owned: StrictModes must be off"
    assert sshd["authorizedkeysfile"] == [f"{mount}/authorized_keys"]
    # sshd runs as the image user: its pid file must be somewhere that user writes, not the read-only mount.
    (pidfile,) = sshd["pidfile"]
    assert pidfile.startswith(SSHD_DIR + "/")
    assert sshd["passwordauthentication"] == ["no"]
    assert sshd["allowusers"] == [USER]


def test_the_image_ships_no_host_key(dockerfile: Dockerfile, sshd: dict[str, list[str]]) -> None:
    """A key baked into a public image is held by everyone who pulls it: the worker entrypoint makes
    fresh ones at every start, for each `~/.sshd/ssh_host_<type>_key` HostKey of the config."""
    runs = " ".join(dockerfile.runs())
    assert "ssh-keygen" not in runs, (
        "host keys are generated at start by the worker entrypoint, never at build"
    )
    # openssh-server's installation generates /etc/ssh host keys: the same RUN removes them.
    (install,) = [r for r in dockerfile.runs() if re.search(r"apt-get install[^&]*\sopenssh-server", r)]
    assert re.search(r"rm -f /etc/ssh/ssh_host_\*", install)
    assert re.search(r"rm -f [^&]*/etc/ssh/ssh_host_\*_key\.pub", install)
    own = [key for key in sshd["hostkey"] if key.startswith(SSHD_DIR + "/")]
    assert own, "sshd has host keys of its own under ~/.sshd (it must start without the Secret too)"
    for key in own:
        assert re.fullmatch(rf"{re.escape(SSHD_DIR)}/ssh_host_(ed25519|ecdsa|rsa)_key", key), key
    assert {key for key in sshd["hostkey"] if key not in own} <= {f"{HOME}/.ssh/id_rsa"}


def test_sshd_folder_belongs_to_the_user_alone(dockerfile: Dockerfile) -> None:
    """~/.sshd holds the generated private keys: uid 1000 owns it and nobody else may read it."""
    runtime_runs = " ".join(i.args for i in dockerfile.of("RUN", stage="runtime"))
    copies = [i.args for i in dockerfile.of("COPY", stage="runtime") if i.args.split()[-1] == SSHD_CONFIG]
    assert copies and copies[0].startswith(f"--chown={UID}:{GID} ")
    assert re.search(rf"chown -R {UID}:{GID} {HOME}(\s|$)", runtime_runs)
    assert re.search(rf"chmod 700 [^&]*{re.escape(SSHD_DIR)}(\s|$)", runtime_runs)


def test_the_image_config_files_are_repository_files(dockerfile: Dockerfile) -> None:
    """Podman's builder has no heredoc COPY: what the image ships is a file of image/, copied as is."""
    assert not [i.args for i in dockerfile.instructions if i.keyword in {"COPY", "RUN"} and "<<" in i.args]
    for dest in (SSHD_CONFIG, "/etc/ssh/ssh_config.d/50-pipelora.conf"):
        source = dockerfile.copied_file(dest)
        assert source.parent == IMAGE_FILES and source.is_file(), source


def test_ssh_sessions_get_the_image_path(sshd: dict[str, list[str]], dockerfile: Dockerfile) -> None:
    """mpirun starts ranks over ssh, which does not pass the container's environment on."""
    (setenv,) = sshd["setenv"]
    path = dict(item.split("=", 1) for item in shlex.split(setenv))["PATH"].split(":")
    env = " ".join(i.args for i in dockerfile.of("ENV", stage="runtime"))
    venv_bin = re.search(r"PATH=(\S+?):", env).group(1)
    assert path[0] == venv_bin == "/opt/venv/bin"
    assert "/usr/bin" in path  # orted and mpirun from the distribution's Open MPI


def test_ssh_client_skips_host_key_checks_and_uses_the_sshd_port(dockerfile: Dockerfile) -> None:
    conf = ssh_options(dockerfile.copied_file("/etc/ssh/ssh_config.d/50-pipelora.conf").read_text())
    assert conf["port"] == [str(SSH_PORT)]
    assert conf["stricthostkeychecking"] == ["no"]
    assert conf["userknownhostsfile"] == ["/dev/null"]


def test_worker_runs_the_image_sshd_on_the_chart_port(rendered: list[dict], sshd: dict) -> None:
    """The worker runs sshd with the image's config: itself, or through the worker entrypoint."""
    worker = worker_container(rendered)
    argv = [str(a) for a in [*worker["command"], *worker.get("args", [])]]
    port = int(sshd["port"][0])
    assert [p["containerPort"] for p in worker["ports"]] == [port]
    probe = worker["readinessProbe"]
    if "tcpSocket" in probe:
        assert probe["tcpSocket"]["port"] == port
    if Path(argv[0]).name == "sshd":
        assert argv[argv.index("-f") + 1] == SSHD_CONFIG
        return
    assert pipelora_subcommands(argv) == ["worker"], argv
    if "--sshd-config" in argv:
        assert argv[argv.index("--sshd-config") + 1] == SSHD_CONFIG
    else:  # the entrypoint's default
        cli = Path(sys.executable).parent / "pipelora-k8s"
        proc = subprocess.run([str(cli), "worker", "--help"], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert SSHD_CONFIG in " ".join(proc.stdout.split()), "the worker entrypoint's default sshd config"


def test_image_makes_the_pod_runtime_folder_the_worker_writes(dockerfile: Dockerfile) -> None:
    """The entrypoint writes its ready file and the ranks' relay under the pod's runtime folder (an
    emptyDir in the chart); the image has it too, writable by uid 1000, so the worker also runs in a
    bare container."""
    from pipelora.workflow.values import chart_values

    folder = chart_values(job_spec()).get("podRuntimeDir")
    assert folder, "the chart values name the pod runtime folder"
    runtime_runs = " ".join(i.args for i in dockerfile.of("RUN", stage="runtime"))
    assert re.search(rf"mkdir -p [^&]*{re.escape(folder)}(\s|$)", runtime_runs)
    assert re.search(rf"chown {UID}:{GID} [^&]*{re.escape(folder)}(\s|$)", runtime_runs)


def test_chart_runs_the_mpi_the_image_installs(rendered: list[dict], dockerfile: Dockerfile) -> None:
    assert mpijob(rendered)["spec"]["mpiImplementation"] == "OpenMPI"
    apt = " ".join(r for r in dockerfile.runs() if "apt-get install" in r)
    for package in ("openmpi-bin", "openssh-server", "openssh-client"):
        assert re.search(rf"\s{package}(\s|$)", apt), package


# ---------------------------------------------------------------------------------------------------
# Commands the chart runs


def probe_commands(container: dict[str, Any]) -> list[list[str]]:
    return [
        [str(a) for a in container[probe]["exec"]["command"]]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe")
        if "exec" in container.get(probe, {})
    ]


def test_every_chart_container_starts_a_program_of_the_image(
    rendered: list[dict], dockerfile: Dockerfile, pyproject: dict
) -> None:
    apt = " ".join(r for r in dockerfile.runs() if "apt-get install" in r)
    scripts = set(pyproject["project"]["scripts"])
    seen = []
    for name, container in containers(rendered + render(gpu={"enabled": False})):
        seen.append(name)
        for argv in [[str(a) for a in container["command"]], *probe_commands(container)]:
            program = argv[0]
            if Path(program).name in scripts:
                assert "pipelora-k8s" in dockerfile.of("ENTRYPOINT")[-1].args
            elif program in BASE_PROGRAMS:
                continue
            else:
                assert program in PROGRAM_PACKAGES, (
                    f"{name} starts {program}, which the image does not provide"
                )
                assert PROGRAM_PACKAGES[program] in apt
    assert {"dataprep/dataprep", "launcher/launcher", "worker/worker"} <= set(seen)


def test_every_pipelora_command_the_chart_runs_exists(rendered: list[dict]) -> None:
    from pipelora.workflow.values import chart_values

    argvs = [c["command"] for _, c in containers(rendered)]
    argvs += [probe for _, c in containers(rendered) for probe in probe_commands(c)]
    argvs += list(chart_values(job_spec()).get("commands", {}).values())
    subcommands = sorted({sub for argv in argvs for sub in pipelora_subcommands([str(a) for a in argv])})
    assert {"dataprep", "train"} <= set(subcommands)
    cli = Path(sys.executable).parent / "pipelora-k8s"
    for sub in subcommands:
        proc = subprocess.run([str(cli), sub, "--help"], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"`pipelora-k8s {sub} --help` failed: {proc.stderr[-2000:]}"
        assert "Usage:" in proc.stdout


def test_the_chart_command_helper_finds_subcommands() -> None:
    argv = ["mpirun", "-np", "4", "-x", "A=1", "pipelora-k8s", "train", "--config", "x.yaml"]
    assert pipelora_subcommands(argv) == ["train"]
    assert pipelora_subcommands(["/opt/venv/bin/pipelora-k8s", "dataprep"]) == ["dataprep"]
    assert pipelora_subcommands(["/usr/sbin/sshd", "-De"]) == []


# ---------------------------------------------------------------------------------------------------
# Repository and tags


def image_workflow() -> dict[str, Any]:
    doc = yaml.safe_load(IMAGE_WORKFLOW.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as a boolean
    return doc


def workflow_step(job: dict[str, Any], uses: str, index: int = -1) -> dict[str, Any]:
    steps = [s for s in job["steps"] if s.get("uses", "").startswith(uses + "@")]
    assert steps, f"the image workflow has no {uses} step"
    return steps[index]


def github_owner(url: str) -> str:
    match = re.match(r"https://github\.com/([^/]+)/", url)
    assert match, url
    return match.group(1)


def test_workflow_pushes_the_repository_the_chart_pulls(
    values: dict, chart_meta: dict, dockerfile: Dockerfile
) -> None:
    workflow = image_workflow()
    job = workflow["jobs"]["build"]
    images = workflow_step(job, "docker/metadata-action")["with"]["images"]
    owner = github_owner(chart_meta["home"])
    resolved = (
        images.replace("${{ env.REGISTRY }}", workflow["env"]["REGISTRY"])
        .replace("${{ github.repository_owner }}", owner)
        .replace("${{ env.IMAGE_NAME }}", workflow["env"]["IMAGE_NAME"])
    )
    assert resolved == values["image"]["repository"] == f"ghcr.io/{owner}/pipelora-k8s"
    labels = " ".join(i.args for i in dockerfile.of("LABEL"))
    assert f'org.opencontainers.image.source="{chart_meta["home"]}"' in labels


def test_tag_scheme_matches_the_chart_and_the_spec_default(
    values: dict, chart_meta: dict, pyproject: dict
) -> None:
    from pipelora import __version__
    from pipelora.config import ClusterSpec

    version = pyproject["project"]["version"]
    assert chart_meta["appVersion"] == version == __version__
    assert values["image"]["tag"] in ("", version), "the chart's default tag is its appVersion"
    default_image = ClusterSpec().image
    assert default_image == f"{values['image']['repository']}:{version}"

    workflow = image_workflow()
    job = workflow["jobs"]["build"]
    meta = workflow_step(job, "docker/metadata-action")["with"]
    tags = [line.strip() for line in meta["tags"].splitlines() if line.strip()]
    assert "type=semver,pattern={{version}}" in tags  # v0.1.0 → 0.1.0, the appVersion
    assert any(t.startswith("type=sha,prefix=sha-") for t in tags)
    assert "latest=false" in meta["flavor"]
    # Pushed on main and on version tags, and the tag check ties v<version> to pyproject's version.
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert any(fnmatch.fnmatch(f"v{version}", pattern) for pattern in workflow["on"]["push"]["tags"])
    check = next(s for s in job["steps"] if "GITHUB_REF_NAME#v" in s.get("run", ""))
    assert "pyproject.toml" in check["run"]


def test_both_variants_build_from_one_dockerfile_with_the_cpu_suffix(dockerfile: Dockerfile) -> None:
    job = image_workflow()["jobs"]["build"]
    variants = {v["variant"]: v["suffix"] for v in job["strategy"]["matrix"]["include"]}
    assert variants == {"cuda": "", "cpu": "-cpu"}
    meta = workflow_step(job, "docker/metadata-action")["with"]
    assert "suffix=${{ matrix.suffix }}" in meta["flavor"]
    build = workflow_step(job, "docker/build-push-action")["with"]
    assert "VARIANT=${{ matrix.variant }}" in build["build-args"]
    assert build["cache-from"].startswith("type=gha") and build["cache-to"].startswith("type=gha")
    assert dockerfile.global_args["VARIANT"] == "cuda"
    stages = dockerfile.stages()
    for variant in variants:
        assert f"base-{variant}" in stages
    assert stages["runtime"] == "base-${VARIANT}"
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", stages["base-cuda"])
    # Debian's slim image: debootstrap --variant=minbase makes a faithful stand-in where nothing can
    # be pulled (scripts/base_image.sh), and bookworm's Python 3.11 matches the cp311 CPU torch wheel.
    assert re.fullmatch(r"debian:\w+-slim", stages["base-cpu"])
    assert stages["builder"] == stages["requirements"] == "base-cpu"


def test_cuda_base_and_torch_index_agree(dockerfile: Dockerfile) -> None:
    """torch 2.13 is built for CUDA 12.6 and 13.0 (no 12.8 build any more): the cu<major><minor>
    index has to match the base's CUDA, and the reason is written next to the choice."""
    stages = dockerfile.stages()
    major, minor = re.search(r"cuda:(\d+)\.(\d+)", stages["base-cuda"]).groups()
    channel = dockerfile.global_args["TORCH_CHANNEL"]
    assert channel == f"cu{major}{minor}"
    assert Version(dockerfile.global_args["TORCH_VERSION"]) >= Version("2.12")
    assert channel in {"cu126", "cu130"}, (
        "torch 2.12+ publishes CUDA 12.6 and 13.0 builds (13.2 experimental)"
    )
    text = (REPO / "Dockerfile").read_text()
    comment = text[: text.index("ARG CUDA_BASE=")].rsplit("ARG VARIANT", 1)[-1]
    assert f"{major}.{minor}" in comment and "torch" in comment, "the Dockerfile says why this CUDA base"


def test_every_stage_that_runs_pip_takes_the_local_pip_settings(dockerfile: Dockerfile) -> None:
    """PIP_CERT and PIP_FIND_LINKS, empty by default: GitHub's build stays plain, a local build
    only mounts its CA bundle and wheel folder and names them (scripts/build_image.sh)."""
    stages = {i.stage for i in dockerfile.of("RUN") if re.search(r"(^|\s)pip (install|wheel)", i.args)}
    assert {"builder", "runtime"} <= stages
    for stage in stages:
        args = {i.args for i in dockerfile.of("ARG", stage=stage)}
        assert {'PIP_CERT=""', 'PIP_FIND_LINKS=""'} <= args, stage
    assert "PIP_CERT" not in dockerfile.global_args and "PIP_FIND_LINKS" not in dockerfile.global_args


def test_heavy_layers_come_before_the_project_code(dockerfile: Dockerfile) -> None:
    """A code change rebuilds the builder's wheel and the runtime's last install, nothing heavy:
    the runtime stage copies no source, installs the dependencies from a list made from
    pyproject.toml alone, and installs the project's wheel without dependencies, after them."""
    runtime = [i for i in dockerfile.instructions if i.stage == "runtime"]
    runs = [(n, i.args) for n, i in enumerate(runtime) if i.keyword == "RUN"]

    def first(pattern: str) -> int:
        found = [n for n, args in runs if re.search(pattern, args)]
        assert found, pattern
        return found[0]

    apt, torch = first(r"apt-get install"), first(r'"torch==\$\{TORCH_VERSION\}')
    deepspeed, deps = first(r'"deepspeed==\$\{DEEPSPEED_VERSION\}"'), first(r"-r /tmp/requirements\.txt")
    wheel = first(r"pipelora_k8s-\*\.whl")
    assert apt < torch < deepspeed < deps < wheel
    assert "--no-deps" in runtime[wheel].args
    copies = [(n, i.args) for n, i in enumerate(runtime) if i.keyword == "COPY"]
    assert [args for _, args in copies if args.startswith("--from=builder")] == [
        "--from=builder /dist/ /tmp/dist/"
    ]
    assert max(n for n, args in copies if args.startswith("--from=builder")) > deps
    for _, args in copies:
        if not args.startswith("--from"):
            assert all(w.startswith("image/") for w in args.split()[:-1] if not w.startswith("--")), args
    (requirements,) = [n for n, args in copies if args.startswith("--from=requirements")]
    assert requirements < deps
    assert [i.args for i in dockerfile.of("COPY", stage="requirements")] == [
        "pyproject.toml /src/pyproject.toml"
    ]


def test_test_workflow_runs_make_test() -> None:
    doc = yaml.safe_load(TEST_WORKFLOW.read_text())
    runs = [s.get("run", "") for job in doc["jobs"].values() for s in job["steps"]]
    assert any(re.match(r"make test(\s|$)", r.strip()) for r in runs)


# ---------------------------------------------------------------------------------------------------
# Versions and build steps


def makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*:?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert match, f"the Makefile sets no {name}"
    return match.group(1)


def test_image_pins_the_torch_and_deepspeed_the_suite_tests(dockerfile: Dockerfile, pyproject: dict) -> None:
    args = dockerfile.global_args
    assert args["TORCH_VERSION"] == makefile_var("TORCH_VERSION")
    assert args["DEEPSPEED_VERSION"] == makefile_var("DEEPSPEED_VERSION")
    ranges = {}
    for requirement in pyproject["project"]["dependencies"]:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
        ranges[name.lower()] = SpecifierSet(spec)
    for package, arg in [
        ("torch", "TORCH_VERSION"),
        ("deepspeed", "DEEPSPEED_VERSION"),
        ("transformers", "TRANSFORMERS_VERSION"),
        ("peft", "PEFT_VERSION"),
    ]:
        assert Version(args[arg]) in ranges[package], (
            f"{arg}={args[arg]} is outside pyproject's {package} range"
        )


def test_deepspeed_is_built_against_the_installed_torch(dockerfile: Dockerfile) -> None:
    runs = dockerfile.runs()
    (torch,) = [r for r in runs if '"torch==${TORCH_VERSION}' in r]
    (install,) = [r for r in runs if "deepspeed==" in r]
    assert "DS_BUILD_OPS=0" in install and "--no-build-isolation" in install
    assert runs.index(torch) < runs.index(install)
    # The build for the variant, by its local version (+cpu, +cu130): never PyPI's default CUDA build.
    assert '"torch==${TORCH_VERSION}+${channel}"' in torch
    assert "download.pytorch.org/whl/${channel}" in torch
    # The dependencies' install holds torch and DeepSpeed where they are.
    (deps,) = [r for r in runs if "-r /tmp/requirements.txt" in r]
    assert re.search(r"-c /tmp/installed\.txt", deps) and "(torch|deepspeed)==" in deps


def test_project_wheel_is_built_in_a_builder_stage(dockerfile: Dockerfile) -> None:
    assert any("pip wheel" in r.args for r in dockerfile.of("RUN", stage="builder"))
    copied = [i.args for i in dockerfile.of("COPY", stage="runtime") if i.args.startswith("--from=builder")]
    assert copied, "the runtime stage installs the wheel the builder made"
    assert dockerfile.of("ENTRYPOINT")[-1].args == '["pipelora-k8s"]'


def test_image_carries_the_oci_labels(dockerfile: Dockerfile, pyproject: dict) -> None:
    labels = dict(
        re.findall(
            r'org\.opencontainers\.image\.(\w+)="([^"]*)"', " ".join(i.args for i in dockerfile.of("LABEL"))
        )
    )
    for key in ("title", "description", "source", "version", "revision", "created", "licenses"):
        assert labels.get(key), key
    assert labels["licenses"] == pyproject["project"]["license"]
    # The per-commit args come after the last RUN: a new value of an ARG misses the cache of every
    # later RUN, which would rebuild torch and DeepSpeed on every commit.
    runtime = [i for i in dockerfile.instructions if i.stage == "runtime"]
    last_run = max(n for n, i in enumerate(runtime) if i.keyword == "RUN")
    for arg in ("VERSION", "REVISION", "CREATED"):
        (declared,) = [n for n, i in enumerate(runtime) if i.keyword == "ARG" and i.args == arg]
        assert declared > last_run, f"ARG {arg} is declared before a RUN of the runtime stage"
    assert labels["version"] == "${VERSION}"
    assert dockerfile.global_args["VERSION"] == pyproject["project"]["version"]


# ---------------------------------------------------------------------------------------------------
# The build context


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder covers its contents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_build_context_holds_what_the_build_copies_and_nothing_else(dockerfile: Dockerfile) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for ins in dockerfile.of("COPY"):
        if not ins.args.startswith("--from"):
            sources += [w for w in ins.args.split()[:-1] if not w.startswith("--")]
    assert "pyproject.toml" in sources and "workflow/" in sources and "image/sshd_config" in sources
    for source in sources:
        probe = source.rstrip("/") + ("/__init__.py" if source.endswith("/") else "")
        assert (REPO / source).exists(), source
        assert not dockerignore_excludes(probe, patterns), f"{probe} is copied but .dockerignore excludes it"
    for probe in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "runs/x/data/manifest.json",
        "workflow/__pycache__/cli.cpython-311.pyc",
        "pipelora_k8s.egg-info/PKG-INFO",
    ):
        assert dockerignore_excludes(probe, patterns), f"{probe} would be sent to the build"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    assert dockerignore_excludes("a/b.txt", ["**"])
    assert not dockerignore_excludes("src/x.py", ["**", "!src/"])
    assert dockerignore_excludes("src/__pycache__/x.pyc", ["**", "!src/", "**/__pycache__"])
    assert not dockerignore_excludes("README.md", ["*.txt"])
