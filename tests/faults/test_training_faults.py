"""A 2-stage training run under mpirun through the fault proxy: a seeded mix of every fault kind on
15% of the requests (weights, shards, checkpoints, progress, logs, the adapter) ends with the very
adapter a fault-free run writes, no commit marker ever names a missing or short object, and a
persistent outage in the middle of the run ends the run in one sentence per failing rank (the
launcher ends the others), never a hang."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from typing import Any

import psutil
import pytest
from fault_runs import HANG_GUARD_S, FaultWorld, MarkerWitness
from s3faults import KINDS, FaultProxy

from pipelora.storage import S3Storage

pytestmark = pytest.mark.slow

MIX_SEED = 21
MIX_RATE = 0.15
STEPS = (2, 4, 6)  # checkpoint_every_steps 2 of max_steps 6; keep_checkpoints 2 prunes step 2


def check(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _outcome(world: FaultWorld, name: str) -> dict[str, Any]:
    layout = world.layout(name)
    return {"adapter": world.read(layout.adapter_weights), "adapter_config": world.read(layout.adapter_config),
            "losses": json.loads(world.read(layout.progress))["losses"]}


@pytest.fixture(scope="module")
def clean(fault_world: FaultWorld) -> dict[str, Any]:
    fault_world.copy_data("tr-clean")
    check(fault_world.train(2, fault_world.write_spec(fault_world.spec("tr-clean"))))
    return _outcome(fault_world, "tr-clean")


@pytest.fixture(scope="module")
def mixed(fault_world: FaultWorld, s3_endpoint: str) -> Any:
    witness = MarkerWitness(fault_world)
    with FaultProxy(s3_endpoint, kinds=KINDS, rate=MIX_RATE, seed=MIX_SEED, delay_s=3.0, observe=witness) as proxy:
        fault_world.copy_data("tr-mixed")
        done = check(fault_world.train(2, fault_world.write_spec(fault_world.spec("tr-mixed", endpoint=proxy.url))))
    return {"done": done, "proxy": proxy, "witness": witness, **_outcome(fault_world, "tr-mixed")}


def test_a_seeded_fault_mix_ends_with_the_adapter_of_a_fault_free_run(clean: dict[str, Any],
                                                                      mixed: dict[str, Any]) -> None:
    proxy: FaultProxy = mixed["proxy"]
    assert mixed["adapter"] == clean["adapter"]  # byte for byte
    assert mixed["adapter_config"] == clean["adapter_config"]
    assert mixed["losses"] == clean["losses"] and len(clean["losses"]) == 6
    injected = sum(proxy.counts.values())
    assert proxy.requests >= 100 and injected >= 0.08 * proxy.requests, (proxy.counts, proxy.requests)
    assert len(proxy.counts) >= 4, proxy.counts  # most kinds, not one
    assert proxy.observer_errors == []


def test_no_commit_marker_ever_names_a_missing_or_short_object(fault_world: FaultWorld,
                                                               mixed: dict[str, Any]) -> None:
    layout = fault_world.layout("tr-mixed")
    witness: MarkerWitness = mixed["witness"]
    marker_keys = {f"runs/tr-mixed/{layout.checkpoint_marker(step).split('/runs/tr-mixed/', 1)[1]}"
                   for step in STEPS}
    written = {key for key, _ in witness.seen}
    assert written == marker_keys, witness.seen  # every checkpoint's marker was seen on its way out
    assert all(problems == [] for _, problems in witness.seen), witness.seen
    # After the run, every marker left is verified object by object (size and sha256, streamed).
    store = S3Storage(endpoint_url=fault_world.endpoint)
    for step in STEPS[1:]:
        assert store.verify_committed(layout.checkpoint_marker(step))["step"] == step
    assert store.list(layout.checkpoint(STEPS[0])) == []  # the pruned checkpoint is gone whole


@pytest.mark.timeout(HANG_GUARD_S)  # a hang guard, not a performance bound
def test_an_outage_in_the_middle_of_a_run_ends_every_rank_in_one_sentence(
        fault_world: FaultWorld, s3_endpoint: str) -> None:
    with FaultProxy(s3_endpoint) as proxy:
        fault_world.copy_data("tr-outage")
        config = fault_world.write_spec(fault_world.spec("tr-outage", endpoint=proxy.url))
        proc = subprocess.Popen(fault_world.train_cmd(2, config), env=fault_world.train_env(config),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err: list[str] = []
        drain = threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True)
        drain.start()
        out: list[str] = []
        try:
            for line in proc.stdout or []:
                out.append(line)
                if re.match(r"^\[stage 2/2 dp 0/1\] step 3/6 ", line) and proxy.outage is None:
                    proxy.configure(outage="slowdown-503")  # from here on, every request is refused
            proc.wait(timeout=HANG_GUARD_S)
        finally:
            if proc.poll() is None:
                proc.kill()
        drain.join(timeout=60)
    assert proxy.outage == "slowdown-503", "the run never reached step 3"
    assert proc.returncode != 0
    stderr = "".join(err)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors, stderr[-5000:]
    sentence = re.compile(r"^error: \[rank [01]\] .*s3://" + fault_world.bucket + r"/runs/tr-outage/\S+: S3 answered "
                          r"(SlowDown \(503\)|503) at " + re.escape(proxy.url) + r" to all 5 attempts; .*$")
    assert all(sentence.match(line) for line in errors), errors
    assert "Traceback" not in stderr, stderr[-5000:]
    # A rank that did not report was ended by the launcher once the first one failed: none is left.
    assert "exited with non-zero status" in stderr
    assert [p.pid for p in psutil.process_iter(["cmdline"]) if str(config) in (p.info["cmdline"] or [])] == []
    steps = [int(m) for m in re.findall(r"step (\d+)/6 loss", "".join(out))]
    assert max(steps) < 6  # it stopped, rather than finishing while the store was refusing everything
