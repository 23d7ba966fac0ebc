"""One writer per run: the lease over a real moto S3 server (with conditional writes, and with the
fallback for stores without them) and over local paths."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipelora import lease as lease_mod
from pipelora.layout import RunLayout
from pipelora.lease import (
    FencedStorage,
    Lease,
    LeaseHeld,
    LeaseLost,
    LeaseRecord,
    Process,
    current_holder,
    refuse_if_held,
    supports_conditional_writes,
    utc,
)
from pipelora.storage import S3Storage, Storage, StorageError, open_storage

HANG_GUARD_S = 60  # a wait that never ends fails the test instead of hanging it; not a performance bound


class Clock:
    """A wall clock the test moves by hand: expiry is decided on it, not on how fast the machine is."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> tuple[Storage, RunLayout, bool | None]:
    """(storage, run layout, `conditional` for Lease.acquire) for one way of swapping the lease."""
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.3)
    if kind == "local":
        return open_storage(str(tmp_path)), RunLayout.of(str(tmp_path / "runs"), "job"), None
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    storage = open_storage("s3://x", endpoint_url=endpoint)
    return storage, RunLayout.of(f"s3://{bucket}/runs", "job"), None if kind == "s3" else False


@pytest.fixture(params=["s3", "s3-settled", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> tuple[Storage, RunLayout, bool | None]:
    """Each way of swapping the lease: S3 conditional writes, the S3 fallback, a local lock file."""
    return make_store(request.param, request, tmp_path, monkeypatch)


# moto applies If-None-Match without a lock, so racing creates can both pass there: the atomicity of
# conditional writes is the store's own (AWS S3, MinIO); the two swaps implemented here are raced.
@pytest.fixture(params=["s3-settled", "local"])
def raced_store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> tuple[Storage, RunLayout, bool | None]:
    return make_store(request.param, request, tmp_path, monkeypatch)


def take(store: tuple[Storage, RunLayout, bool | None], clock: Clock, owner: str) -> Lease:
    storage, layout, conditional = store
    return Lease.acquire(storage, layout, run="job", clock=clock, conditional=conditional, owner=owner)


def stored(store: tuple[Storage, RunLayout, bool | None]) -> LeaseRecord:
    storage, layout, _ = store
    return LeaseRecord.from_bytes(storage.read_bytes(layout.lease), where=layout.lease)


def test_a_second_attempt_on_a_live_lease_is_refused_naming_the_holder_and_its_expiry(store) -> None:
    clock = Clock()
    first = take(store, clock, "pod-a:11:aaaa")
    assert first.epoch == 1 and stored(store).owner == "pod-a:11:aaaa"
    clock.now += 59
    with pytest.raises(LeaseHeld) as refused:
        take(store, clock, "pod-b:22:bbbb")
    until = utc(1_000_000.0 + lease_mod.LEASE_SECONDS)
    assert str(refused.value).startswith(f"run 'job' is being written by attempt pod-a:11:aaaa (lease epoch 1) "
                                         f"until {until}:")
    assert refused.value.exit_code == LeaseHeld.exit_code != 0
    assert stored(store).owner == "pod-a:11:aaaa"  # the refused attempt wrote nothing


def test_after_expiry_a_new_attempt_takes_over_and_the_stale_one_can_write_nothing(store) -> None:
    clock = Clock()
    stale = take(store, clock, "pod-a:11:aaaa")
    clock.now += lease_mod.LEASE_SECONDS + 1  # pod-a stalled: no renewal for longer than the lease
    newer = take(store, clock, "pod-b:22:bbbb")
    assert newer.epoch == 2
    assert "(from pod-a:11:aaaa, epoch 1: expired)" in newer.describe()
    with pytest.raises(LeaseLost) as lost:
        stale.confirm("commit checkpoint step 4")
    assert str(lost.value) == (
        f"refusing to commit checkpoint step 4: this attempt (pod-a:11:aaaa, epoch 1) no longer holds the lease of "
        f"run 'job' ({store[1].lease}); pod-b:22:bbbb took it over at epoch 2")
    with pytest.raises(LeaseLost):
        stale.renew()
    stale.release()  # never touches a lease it lost
    assert (stored(store).owner, stored(store).epoch, stored(store).released) == ("pod-b:22:bbbb", 2, False)
    newer.confirm("commit checkpoint step 4")
    assert stored(store).epoch == 2


def test_renewal_keeps_the_lease_live_past_its_first_expiry(store) -> None:
    clock = Clock()
    holder = take(store, clock, "pod-a:11:aaaa")
    clock.now += 50
    holder.renew()
    clock.now += 20  # 70 s after taking it: expired but for the renewal
    with pytest.raises(LeaseHeld):
        take(store, clock, "pod-b:22:bbbb")
    assert stored(store).expires_at == 1_000_000.0 + 50 + lease_mod.LEASE_SECONDS


def test_a_released_lease_is_taken_at_once_with_the_next_epoch(store) -> None:
    clock = Clock()
    take(store, clock, "pod-a:11:aaaa").release()
    record = stored(store)
    assert record.released and record.epoch == 1
    clock.now += 1
    assert current_holder(store[0], store[1], clock=clock) is None
    successor = take(store, clock, "pod-a:33:cccc")
    assert successor.epoch == 2 and "(from pod-a:11:aaaa, epoch 1: released)" in successor.describe()


def test_a_holder_whose_process_died_on_this_machine_is_taken_over_before_expiry(store) -> None:
    storage, layout, _ = store
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    here = Process.this()
    dead = replace(here, pid=child.pid, started=lease_mod._start_ticks(child.pid))
    child.communicate(b"", timeout=HANG_GUARD_S)
    clock = Clock(time.time())
    killed = LeaseRecord(run="job", owner="vm:killed:dddd", epoch=4, expires_at=clock.now + 55, renewed_at=clock.now,
                         process=dead, nonce="x")
    storage.write_bytes(layout.lease, killed.to_bytes())
    assert dead.known_dead() and not here.known_dead()
    elsewhere = replace(killed, process=replace(dead, boot_id="another-machine"))
    assert not elsewhere.process.known_dead()  # a process of another machine is never presumed dead
    successor = take(store, clock, "vm:retry:eeee")
    assert successor.epoch == 5 and "its process is gone" in successor.describe()


def test_concurrent_attempts_one_wins(raced_store) -> None:
    store = raced_store
    clock = Clock()
    start = threading.Barrier(4)
    won: list[str] = []
    refused: list[str] = []

    def attempt(owner: str) -> None:
        start.wait(timeout=HANG_GUARD_S)
        try:
            take(store, clock, owner)
            won.append(owner)
        except LeaseHeld:
            refused.append(owner)

    threads = [threading.Thread(target=attempt, args=(f"pod:{i}:race",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG_GUARD_S)
    assert len(won) == 1 and len(refused) == 3, (won, refused)
    assert stored(store).owner == won[0] and stored(store).epoch == 1


def test_fenced_writes_stop_once_the_lease_is_taken_over(store) -> None:
    storage, layout, _ = store
    clock = Clock()
    holder = take(store, clock, "pod-a:11:aaaa")
    fenced = FencedStorage(storage, holder, action="write the adapter")
    target = f"{layout.adapter}/weights.bin"
    fenced.write_bytes(target, b"first")
    clock.now += lease_mod.LEASE_SECONDS + 1
    take(store, clock, "pod-b:22:bbbb")
    with pytest.raises(LeaseLost, match=r"^refusing to write the adapter \(.*weights.bin\): this attempt"):
        fenced.write_bytes(target, b"stale")
    assert storage.read_bytes(target) == b"first"


def test_the_renewing_thread_extends_the_lease_and_notices_a_take_over(store) -> None:
    storage, layout, conditional = store
    holder = Lease.acquire(storage, layout, run="job", conditional=conditional, owner="pod-a:11:aaaa")
    first = stored(store).renewed_at
    holder.start_renewing(every_s=0.05)
    deadline = time.monotonic() + HANG_GUARD_S
    while stored(store).renewed_at == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stored(store).renewed_at > first
    taken = replace(stored(store), owner="pod-b:22:bbbb", epoch=2, nonce="other")
    storage.write_bytes(layout.lease, taken.to_bytes())  # as a newer attempt after a stall would
    while not holder.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(LeaseLost, match=r"^refusing to continue: .*pod-b:22:bbbb took it over at epoch 2$"):
        holder.raise_if_lost()
    holder.release()
    assert stored(store).owner == "pod-b:22:bbbb"


def test_refuse_if_held_and_a_foreign_lease_object(store) -> None:
    storage, layout, _ = store
    refuse_if_held(storage, layout, run="job")  # nothing there
    live = LeaseRecord(run="job", owner="elsewhere:1:ffff", epoch=9, expires_at=time.time() + 3600,
                       renewed_at=time.time(), nonce="n")
    storage.write_bytes(layout.lease, live.to_bytes())
    with pytest.raises(LeaseHeld, match=r"^run 'job' is being written by attempt elsewhere:1:ffff \(lease epoch 9\)"):
        refuse_if_held(storage, layout, run="job")
    storage.write_bytes(layout.lease, b"not json")
    with pytest.raises(StorageError, match=r"is not a lease written by pipelora; delete it once no attempt"):
        refuse_if_held(storage, layout, run="job")


def test_moto_honours_conditional_writes_so_the_probe_finds_them(s3_endpoint: str, s3_bucket: str) -> None:
    storage = open_storage("s3://x", endpoint_url=s3_endpoint)
    assert isinstance(storage, S3Storage)
    layout = RunLayout.of(f"s3://{s3_bucket}/runs", "job")
    lease_mod._conditional_support.clear()
    assert supports_conditional_writes(storage, layout.lease_probe("t1")) is True
    assert storage.list(f"s3://{s3_bucket}/runs") == []  # the probe object is gone again
    holder = Lease.acquire(storage, layout, run="job", owner="pod-a:11:aaaa")
    assert type(holder.store).__name__ == "_S3Conditional"
