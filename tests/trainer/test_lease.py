"""One writer per run, as the trainer and `pipelora-k8s run` apply it: a live lease refuses a second
attempt on every rank, an expired or released one is taken over with the next epoch, and an attempt
that lost its lease commits nothing more."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from pipelora.layout import RunLayout
from pipelora.lease import LEASE_SECONDS, Lease, LeaseHeld, LeaseLost, LeaseRecord, Process, utc
from pipelora.storage import LocalStorage
from pipelora.trainer import checkpoint as ckpt
from pipelora.trainer.checkpointing import CheckpointUploads

CLI = str(Path(sys.executable).parent / "pipelora-k8s")
HANG_GUARD_S = 600  # a hung run fails the test instead of the suite; not a performance bound
ELSEWHERE = Process(host="other-node", pid=7, boot_id="another-machine", pid_namespace=1, started=1)


def foreign(name: str, *, owner: str, epoch: int, expires_at: float) -> LeaseRecord:
    """A lease written by an attempt on another machine (never presumed dead from here)."""
    return LeaseRecord(run=name, owner=owner, epoch=epoch, expires_at=expires_at, renewed_at=expires_at - 30,
                       process=ELSEWHERE, nonce=f"{owner}-{epoch}")


def put_lease(world: Any, name: str, record: LeaseRecord) -> None:
    world.client().put_object(Bucket=world.bucket, Key=f"runs/{name}/lease", Body=record.to_bytes())


def stored_lease(world: Any, name: str) -> dict[str, Any]:
    return dict(world.read_json(f"runs/{name}/lease"))


def rank_pids(mpirun_pid: int) -> dict[int, psutil.Process]:
    return {int(c.environ()["OMPI_COMM_WORLD_RANK"]): c for c in psutil.Process(mpirun_pid).children()}


# -- the commit path, in one process ---------------------------------------------------------------------


def test_a_stale_writers_commit_is_refused_and_leaves_no_marker(one_rank, tmp_path: Path) -> None:
    storage = LocalStorage()
    layout = RunLayout.of(str(tmp_path), "run")
    clock = [1_000_000.0]
    stale = Lease.acquire(storage, layout, run="run", clock=lambda: clock[0], owner="pod-a:1:aaaa")
    uploads = CheckpointUploads(storage, layout, rank=0, device=torch.device("cpu"), keep=3, lease=stale)
    snapshot = ckpt.StageSnapshot(stage=0, rank=0, rng=ckpt.rng_state(), lora={"w": torch.ones(2)})
    meta = ckpt.new_meta(step=2, stages=1, data_parallel=1, bounds=(0, 3), data_position={}, losses=[],
                         eval_losses=[])
    uploads.start(2, snapshot, meta)
    uploads.finish()
    assert ckpt.committed_steps(storage, layout) == [2]  # while the lease is ours
    clock[0] += LEASE_SECONDS + 1  # this attempt stalled; a newer one found the lease expired
    Lease.acquire(storage, layout, run="run", clock=lambda: clock[0], owner="pod-b:2:bbbb")
    uploads.start(4, snapshot, ckpt.new_meta(step=4, stages=1, data_parallel=1, bounds=(0, 3), data_position={},
                                             losses=[], eval_losses=[]))
    with pytest.raises(LeaseLost) as refused:
        uploads.finish()
    assert str(refused.value) == (
        f"refusing to commit checkpoint step 4: this attempt (pod-a:1:aaaa, epoch 1) no longer holds the lease of "
        f"run 'run' ({layout.lease}); pod-b:2:bbbb took it over at epoch 2")
    assert ckpt.committed_steps(storage, layout) == [2]
    assert storage.exists(f"{layout.checkpoint(4)}/{ckpt.lora_name(0)}")  # uploaded, never named by a marker


# -- under mpirun, against the moto server ----------------------------------------------------------------


def test_a_second_attempt_on_a_live_lease_is_refused_on_every_rank(s3_world) -> None:
    name = "lease-live"
    holder = foreign(name, owner="other-node:7:abcd1234", epoch=3, expires_at=time.time() + 3600)
    config = s3_world.write_spec(s3_world.spec(name))
    put_lease(s3_world, name, holder)
    done = s3_world.train(2, config)
    assert done.returncode == LeaseHeld.exit_code, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: [rank")]
    expected = (f"run '{name}' is being written by attempt other-node:7:abcd1234 (lease epoch 3) until "
                f"{utc(holder.expires_at)}:")
    assert sorted(e.split("]")[0] for e in errors) == ["error: [rank 0", "error: [rank 1"], done.stderr[-3000:]
    assert all(expected in e for e in errors), errors
    assert "Traceback" not in done.stderr
    assert s3_world.keys(f"runs/{name}/checkpoints/") == [] and s3_world.keys(f"runs/{name}/adapter/") == []
    assert stored_lease(s3_world, name)["nonce"] == holder.nonce  # untouched

    # `pipelora-k8s run` refuses before dataprep or --fresh touch the run folder.
    run = subprocess.run([CLI, "run", "--config", str(config), "--fresh"], env=s3_world.env(), capture_output=True,
                         text=True, timeout=HANG_GUARD_S)
    assert run.returncode == LeaseHeld.exit_code
    assert run.stderr.startswith(f"error: {expected}") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "==> " not in run.stdout
    assert s3_world.keys(f"runs/{name}/data/")  # --fresh did not run either


LINE = re.compile(r"^\[stage (\d)/2 dp 0/1\] step (\d+)/\d+ ")
TAKEN = re.compile(r"^lease of run '([\w-]+)' taken by (\S+) at epoch (\d+) until [^(]+\(from (\S+), epoch (\d+): "
                   r"(\w[\w ]*)\)$", re.M)


def test_after_expiry_a_new_attempt_takes_over_and_a_preempted_one_releases_it(s3_world) -> None:
    name = "lease-takeover"
    config = s3_world.write_spec(s3_world.spec(name))
    put_lease(s3_world, name, foreign(name, owner="other-node:7:dead0000", epoch=7, expires_at=time.time() - 1))
    proc = subprocess.Popen(s3_world.train_cmd(2, config), env=s3_world.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if LINE.match(line) and LINE.match(line)[2] == "2":  # type: ignore[index]
                rank_pids(proc.pid)[1].send_signal(signal.SIGTERM)  # one pod evicted
                break
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 75, err[-3000:]
    taken = TAKEN.findall(out)
    assert len(taken) == 1 and taken[0][0] == name, out[-3000:]
    owner = taken[0][1]
    assert taken[0][2:] == ("8", "other-node:7:dead0000", "7", "expired")
    lease = stored_lease(s3_world, name)
    assert (lease["owner"], lease["epoch"], lease["released"]) == (owner, 8, True)  # released on the way out

    done = s3_world.train(2, config)
    assert done.returncode == 0, done.stderr[-3000:]
    again = TAKEN.findall(done.stdout)
    assert len(again) == 1 and again[0][2:] == ("9", owner, "8", "released")
    lease = stored_lease(s3_world, name)
    assert (lease["owner"], lease["epoch"], lease["released"]) == (again[0][1], 9, True)
    assert s3_world.keys(f"runs/{name}/adapter/")


def test_a_stale_attempt_commits_nothing_once_a_newer_one_took_over(s3_world) -> None:
    name = "lease-stale"
    config = s3_world.write_spec(s3_world.spec(name))
    proc = subprocess.Popen(s3_world.train_cmd(2, config), env=s3_world.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    newer: LeaseRecord | None = None
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if re.match(r"^\[stage 1/2 dp 0/1\] step 1/6 ", line):
                # Freeze rank 0 (a long GC pause, a partitioned node) while a newer attempt takes over:
                # the first commit (step 2) can only come after it is thawed.
                rank0 = rank_pids(proc.pid)[0]
                rank0.send_signal(signal.SIGSTOP)
                deadline = time.monotonic() + HANG_GUARD_S
                while rank0.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
                    time.sleep(0.01)
                held = stored_lease(s3_world, name)
                newer = foreign(name, owner="other-node:8:newer000", epoch=held["epoch"] + 1,
                                expires_at=time.time() + 3600)
                put_lease(s3_world, name, newer)
                rank0.send_signal(signal.SIGCONT)
                break
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert newer is not None, "the run never reached step 1"
    assert proc.returncode == LeaseLost.exit_code, err[-3000:]
    assert re.search(rf"refusing to (commit checkpoint step 2|train past step \d): this attempt \(\S+, epoch "
                     rf"{newer.epoch - 1}\) no longer holds the lease of run '{name}' \(\S+\); other-node:8:newer000 "
                     rf"took it over at epoch {newer.epoch}", err), err[-3000:]
    assert not [k for k in s3_world.keys(f"runs/{name}/checkpoints/") if k.endswith("/COMMITTED")]
    assert s3_world.keys(f"runs/{name}/adapter/") == []
    assert stored_lease(s3_world, name)["nonce"] == newer.nonce  # the stale attempt did not release it either
