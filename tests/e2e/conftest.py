"""Fixtures of the release run in containers: the container engine, the trainer image built from the
Dockerfile, one podman network per module with a moto S3 server on its gateway, and the tiny model
and generated dataset in a bucket there.

Where this machine cannot run containers the tests that need them fail and say why: they are part
of the suite, never skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the `podrun` package beside these tests

from podrun import Network, Podman, cannot_run_containers  # noqa: E402

CLI = str(Path(sys.executable).parent / "pipelora-k8s")
DEFAULT_IMAGE = "localhost/pipelora-k8s:dev-cpu"
BUILD_TIMEOUT_S = 1800
REGION = "us-east-1"


@pytest.fixture(scope="session")
def podman() -> Podman:
    """podman, able to run containers here; the test fails with the reason where it is not."""
    engine = Podman()
    why = cannot_run_containers(engine)
    if why is not None:
        pytest.fail(f"the release's pods cannot run on this machine: {why}")
    return engine


@pytest.fixture(scope="session")
def trainer_image(podman: Podman) -> str:
    """The CPU image of the working tree, built with scripts/build_image.sh (the layer cache makes a
    rebuild take seconds). PIPELORA_TEST_IMAGE names the tag; with PIPELORA_TEST_IMAGE_PREBUILT=1 an
    image of that tag built beforehand is used as it is."""
    tag = os.environ.get("PIPELORA_TEST_IMAGE", DEFAULT_IMAGE)
    if os.environ.get("PIPELORA_TEST_IMAGE_PREBUILT") == "1":
        if not podman.image_exists(tag):
            pytest.fail(f"PIPELORA_TEST_IMAGE_PREBUILT=1 but podman has no image {tag}; build it with "
                        f"`scripts/build_image.sh {tag}` (make image)")
        return tag
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_image.sh"), tag], cwd=REPO, capture_output=True, text=True,
        timeout=BUILD_TIMEOUT_S, env={**os.environ, "PIP": str(Path(sys.executable).parent / "pip")}, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"the trainer image did not build (scripts/build_image.sh {tag}):\n{proc.stderr[-6000:]}")
    return tag


@pytest.fixture(scope="module")
def pod_network(podman: Podman, trainer_image: str) -> Iterator[Network]:
    """One podman network for the module's clusters (their pod names differ by release name)."""
    network = Network.create(podman, image=trainer_image, prefix="pipelora-e2e")
    try:
        yield network
    finally:
        network.remove()


@dataclass(frozen=True)
class PodS3:
    """A moto S3 (and STS) server on the pod network's gateway: the same URL from pods and from here."""

    endpoint: str
    log: Path

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION)

    def requests_from(self, address: str, *, method: str = "POST", path: str = "/") -> int:
        """How many `METHOD path` requests the server logged from `address`."""
        needle = f'"{method} {path} HTTP/1.1"'
        return sum(1 for line in self.log.read_text().splitlines() if line.startswith(address + " ") and needle in line)


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def pod_s3(pod_network: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodS3]:
    """moto listens on the network's gateway address only: pods reach it through their default route,
    this process directly; the rendered `storage.endpoint_url` is that URL."""
    with socket.socket() as sock:
        sock.bind((pod_network.gateway, 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "requests.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", pod_network.gateway, "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        if not _wait_for_port(pod_network.gateway, port, proc, 60):
            pytest.fail(f"moto did not start on {pod_network.gateway}:{port}: {log.read_text()[-2000:]}")
        yield PodS3(f"http://{pod_network.gateway}:{port}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Mistral model (random weights, the real tokenizer) and the generated learnable dataset."""
    root = tmp_path_factory.mktemp("tiny-assets")
    for argv in ([CLI, "init-model", "--family", "mistral", "--preset", "tiny", "--out", str(root / "tiny-mistral")],
                 [CLI, "make-dataset", "--out", str(root / "learnable.jsonl"), "--examples", "300"]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def pod_bucket(pod_s3: PodS3, tiny_assets: Path) -> str:
    """A bucket holding models/tiny-mistral/ and datasets/learnable.jsonl."""
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    s3 = pod_s3.client()
    s3.create_bucket(Bucket=name)
    for path in sorted((tiny_assets / "tiny-mistral").iterdir()):
        s3.upload_file(str(path), name, f"models/tiny-mistral/{path.name}")
    s3.upload_file(str(tiny_assets / "learnable.jsonl"), name, "datasets/learnable.jsonl")
    return name
