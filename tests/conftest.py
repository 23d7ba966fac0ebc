"""Fixtures every part's tests share: a real moto S3 server over HTTP, and paths of shipped data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from net import free_port

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def _wait_for_port(port: int, proc: subprocess.Popen, *, timeout: float) -> bool:
    """True once 127.0.0.1:`port` accepts connections; False if `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.1)


@pytest.fixture(scope="session")
def wait_for_port() -> Callable[..., bool]:
    """`wait_for_port(port, proc, timeout=s)`: for tests that start a server process of their own."""
    return _wait_for_port


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server process on a free loopback port; boto3 talks real HTTP to it."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    if not _wait_for_port(port, proc, timeout=60):
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def _aws_test_credentials() -> Iterator[None]:
    """Credentials moto accepts, in the environment as the standard chain reads them."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    os.environ.setdefault("PIPELORA_S3_MAX_ATTEMPTS", "2")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def shared_data() -> Path:
    """The shared sample data folder beside the checkout; skip where it is absent."""
    folder = SHARED / "data"
    if not (folder / "alpaca_zh_demo.json").exists():
        pytest.skip(f"shared sample data not found at {folder} (it sits beside the checkout in the project workspace)")
    return folder
