"""`pipelora-k8s dataprep` through the fault proxy: a seeded mix of every fault kind on 20% of the
requests (dataset and tokenizer downloads, the manifest check, shard uploads, the commit) changes no
byte of the shards, and a persistent outage ends the command with one sentence."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from s3faults import KINDS, FaultProxy

pytestmark = pytest.mark.slow

MIX_SEED = 5
MIX_RATE = 0.2


def _data(world: Any, name: str) -> dict[str, bytes]:
    prefix = f"runs/{name}/data/"
    return {key[len(prefix):]: world.get(key) for key in world.keys(prefix)}


def _without_duration(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest records how long dataprep took (`stats.seconds`); everything else is content."""
    return {**manifest, "stats": {k: v for k, v in manifest["stats"].items() if k != "seconds"}}


@pytest.fixture(scope="module")
def clean(fault_world: Any) -> dict[str, bytes]:
    done = fault_world.dataprep(fault_world.write_spec(fault_world.spec("dp-clean")))
    assert done.returncode == 0, done.stderr
    return _data(fault_world, "dp-clean")


def test_a_seeded_mix_of_faults_changes_no_byte_of_the_shards(
        fault_world: Any, clean: dict[str, bytes], make_proxy: Callable[..., FaultProxy]) -> None:
    proxy = make_proxy(kinds=KINDS, rate=MIX_RATE, seed=MIX_SEED)
    done = fault_world.dataprep(fault_world.write_spec(fault_world.spec("dp-mixed", endpoint=proxy.url)))
    assert done.returncode == 0, done.stderr
    faulted = _data(fault_world, "dp-mixed")
    assert sorted(faulted) == sorted(clean) and len(clean) >= 3  # manifest, train and eval shards
    shards = [name for name in clean if name.endswith(".safetensors")]
    for name in shards:
        assert faulted[name] == clean[name], name  # byte for byte
    ours, theirs = json.loads(faulted["manifest.json"]), json.loads(clean["manifest.json"])
    assert _without_duration(ours) == _without_duration(theirs)
    assert sorted(ours["files"]) == sorted(shards)
    assert sum(proxy.counts.values()) >= 2 and proxy.requests >= 12, (proxy.counts, proxy.requests)


def test_a_persistent_outage_ends_dataprep_in_one_sentence(
        fault_world: Any, make_proxy: Callable[..., FaultProxy]) -> None:
    proxy = make_proxy(outage="slowdown-503")
    done = fault_world.dataprep(fault_world.write_spec(fault_world.spec("dp-outage", endpoint=proxy.url)))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    # The first call is a HEAD of the dataset, whose answer has no body and so no error code.
    assert re.fullmatch(rf"error: .*cannot read s3://{fault_world.bucket}/\S+: S3 answered (SlowDown \(503\)|503) at "
                        rf"{re.escape(proxy.url)} to all 5 attempts; .*PIPELORA_S3_MAX_ATTEMPTS\S*", lines[0]), lines[0]
    assert proxy.requests == 5  # the first call's attempts, then the command ended
