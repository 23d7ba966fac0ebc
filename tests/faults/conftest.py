"""Fixtures of the S3 fault tests: the fault proxy in front of the session's moto server, and a
tiny model, dataset and prepared data on moto for the dataprep and training runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

SUPPORT = Path(__file__).resolve().parents[1] / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from fault_runs import BUCKET, CLI, DELAY_S, HANG_GUARD_S, FaultWorld  # noqa: E402
from s3faults import FaultProxy  # noqa: E402


@pytest.fixture
def make_proxy(s3_endpoint: str) -> Iterator[Callable[..., FaultProxy]]:
    """`make_proxy(kinds=..., rate=..., seed=...)`: a fault proxy in front of moto, closed after the test."""
    proxies: list[FaultProxy] = []

    def _make(**kwargs: Any) -> FaultProxy:
        kwargs.setdefault("delay_s", DELAY_S)
        proxy = FaultProxy(s3_endpoint, **kwargs)
        proxies.append(proxy)
        return proxy

    yield _make
    for proxy in proxies:
        proxy.close()


@pytest.fixture(scope="session")
def fault_world(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> FaultWorld:
    """Model, dataset and one prepared run on moto, built once for the dataprep and training fault tests."""
    from pipelora.trainer.init_model import write_random_model

    tmp = tmp_path_factory.mktemp("faults")
    world = FaultWorld(s3_endpoint, tmp)
    s3 = world.client()
    s3.create_bucket(Bucket=BUCKET)
    model = write_random_model(tmp / "tiny-mistral", family="mistral", preset="tiny", seed=3,
                               max_shard_bytes=3 * 1024 * 1024)
    for path in sorted(model.iterdir()):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"models/tiny-mistral/{path.name}")
    dataset = tmp / "learnable.jsonl"
    subprocess.run([CLI, "make-dataset", "--out", str(dataset), "--examples", "300", "--seed", "1"], check=True,
                   capture_output=True, timeout=HANG_GUARD_S)
    s3.upload_file(str(dataset), BUCKET, "inputs/learnable.jsonl")
    done = world.dataprep(world.write_spec(world.spec(world.data_source)))
    assert done.returncode == 0, done.stderr
    return world
