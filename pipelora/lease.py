"""One writer per run: the lease an attempt holds on its run folder (`RunLayout.lease`).

A retried launcher, a second `pipelora-k8s run` or a forgotten pod can start while an earlier
attempt of the same run is still alive; two attempts writing one run folder would interleave
checkpoints and adapters. The lease is one small JSON object: the holder (`owner`), an `epoch`
that grows by one at every take-over, and an expiry. Rank 0 of an attempt takes it before
training, a background thread renews it every `RENEW_EVERY_S`, and it lapses `LEASE_SECONDS`
after the last renewal, so an attempt that was killed stops blocking its successor within a
minute; an attempt that ends (finished, preempted, failed) releases it on the way out, and its
successor takes over at once. Right before the writes that make something visible (a checkpoint's
commit marker, the adapter's files) the holder renews the lease conditionally: an attempt that
lost it (its successor took over while it was stalled) is refused instead of writing over newer
work.

Every change is a compare-and-swap on the lease object, by the strongest means the store offers:

- S3 with conditional writes (AWS S3, MinIO, moto): `PutObject` with `If-None-Match: *` creates,
  `If-Match: <etag>` replaces only the version that was read. A store is probed once per bucket
  (a throw-away object written twice, the second time with `If-None-Match: *`), because some
  S3-compatible stores accept and silently ignore the headers.
- S3 without them (the fallback): write, wait `SETTLE_S`, read back and compare. With S3's
  read-after-write consistency the last of several racing writers wins and each of them sees
  who did; attempts starting within `SETTLE_S` of each other is the window this cannot close.
- Local paths: the same swaps under a lock file created with O_EXCL (the lease itself is
  replaced by an atomic rename); a lock older than `STALE_LOCK_S` is from a dead process and is
  broken.

Expiry compares wall clocks of different machines: keep nodes on NTP (seconds of skew against
a 60 s lease are harmless). A holder on this very machine (same boot, same pid namespace, so
the same pod on a cluster) whose process is gone is taken over at once rather than at expiry:
that is the launcher's retry of an attempt whose rank 0 was killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from pipelora.errors import PipeloraError
from pipelora.layout import RunLayout
from pipelora.storage import LocalStorage, ObjectInfo, S3Storage, Storage, StorageError, local_path, split_s3

# A job spec field (e.g. `training.lease_seconds`) may replace these; the defaults suit a
# launcher retry: a killed attempt blocks its successor for at most a minute.
LEASE_SECONDS = 60.0
RENEW_EVERY_S = 15.0
SETTLE_S = 2.0  # the fallback's wait between writing the lease and reading it back
STALE_LOCK_S = 10.0  # a local lock file older than this belongs to a process that died holding it
_ATTEMPTS = 5  # compare-and-swap rounds before giving up on a lease that keeps changing

Clock = Callable[[], float]


class LeaseHeld(PipeloraError):
    """Another live attempt holds the run's lease: this one must not write the run folder."""

    exit_code = 73


class LeaseLost(PipeloraError):
    """This attempt held the lease once but a newer attempt took it over: it must write nothing more."""

    exit_code = 74


# -- the record ------------------------------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot); None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Process:
    """Where the holder runs: enough to tell, from the same machine and pid namespace, that it died."""

    host: str = ""
    pid: int = 0
    boot_id: str = ""
    pid_namespace: int = 0
    started: int | None = None

    @classmethod
    def this(cls) -> Process:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _boot_id(), _pid_namespace(), _start_ticks(pid))

    def known_dead(self) -> bool:
        """True only when this process can see the holder's pid namespace and the holder is not in it."""
        here = Process.this()
        if not self.boot_id or not self.pid or self.boot_id != here.boot_id:
            return False
        if self.pid_namespace != here.pid_namespace or self.host != here.host:
            return False
        started = _start_ticks(self.pid)
        return started is None or (self.started is not None and started != self.started)


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object's content."""

    run: str
    owner: str  # the attempt: "<host>:<pid>:<random>"
    epoch: int
    expires_at: float  # seconds since the epoch (UTC)
    renewed_at: float
    released: bool = False
    process: Process = field(default_factory=Process)
    nonce: str = ""  # unique per write: the version token where the store has no ETag to offer

    def live(self, now: float) -> bool:
        return not self.released and self.expires_at > now

    @property
    def until(self) -> str:
        return utc(self.expires_at)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["expires"] = self.until  # for people reading the object
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> LeaseRecord:
        try:
            data = json.loads(raw)
            return cls(run=str(data["run"]), owner=str(data["owner"]), epoch=int(data["epoch"]),
                       expires_at=float(data["expires_at"]), renewed_at=float(data["renewed_at"]),
                       released=bool(data.get("released", False)), process=_process(data.get("process")),
                       nonce=str(data.get("nonce", "")))
        except (ValueError, KeyError, TypeError):
            raise StorageError(
                f"{where} is not a lease written by pipelora; delete it once no attempt of this run is running"
            ) from None


def _process(data: Any) -> Process:
    """The holder's process from its record; fields this version does not know are left out."""
    if not isinstance(data, dict):
        return Process()
    known = {k: data[k] for k in ("host", "pid", "boot_id", "pid_namespace", "started") if k in data}
    return Process(**known)


def utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _held_message(run: str, uri: str, holder: LeaseRecord) -> str:
    return (f"run '{run}' is being written by attempt {holder.owner} (lease epoch {holder.epoch}) until "
            f"{holder.until}: wait for it to finish, stop it, or retry after that time (a live attempt renews "
            f"its lease every {RENEW_EVERY_S:.0f} s; {uri})")


# -- the stores ------------------------------------------------------------------------------------


class _Store(Protocol):
    """Compare-and-swap on one lease object; a token names the version that was read."""

    uri: str

    def read(self) -> tuple[LeaseRecord | None, str | None]: ...

    def create(self, record: LeaseRecord) -> str | None:
        """Write `record` if no lease object exists; its token, or None when one does."""
        ...

    def swap(self, record: LeaseRecord, token: str) -> str | None:
        """Write `record` if the object is still the version `token`; its token, or None."""
        ...


class _S3Conditional:
    """S3 conditional writes: If-None-Match to create, If-Match on the ETag to replace."""

    def __init__(self, storage: S3Storage, uri: str) -> None:
        self.client, self.uri = storage.client, uri
        self.bucket, self.key = split_s3(uri)

    def _fail(self, exc: Exception, action: str) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get(
                "HTTPStatusCode")
            return StorageError(f"cannot {action} the lease {self.uri}: S3 answered {code}")
        return StorageError(f"cannot {action} the lease {self.uri}: {type(exc).__name__}: {exc}")

    def read(self) -> tuple[LeaseRecord | None, str | None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
            raw = resp["Body"].read()
        except ClientError as exc:
            if _code(exc) == "NoSuchBucket":
                raise StorageError(f"cannot read the lease {self.uri}: bucket '{self.bucket}' does not exist; "
                                   "create it or fix storage.uri") from None
            if _status(exc) == 404:
                return None, None
            raise self._fail(exc, "read") from None
        except BotoCoreError as exc:
            raise self._fail(exc, "read") from None
        return LeaseRecord.from_bytes(raw, where=self.uri), str(resp["ETag"])

    def _put(self, record: LeaseRecord, **condition: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        body = record.to_bytes()
        try:
            if "IfMatch" in condition:
                resp = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                              ContentType="application/json", IfMatch=condition["IfMatch"])
            else:
                resp = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                              ContentType="application/json", IfNoneMatch=condition["IfNoneMatch"])
        except ClientError as exc:
            # 412: the condition failed; 409: a concurrent conditional write won; 404: If-Match on a deleted object.
            if _status(exc) in (409, 412) or (_status(exc) == 404 and "IfMatch" in condition):
                return None
            raise self._fail(exc, "write") from None
        except BotoCoreError as exc:
            raise self._fail(exc, "write") from None
        return str(resp["ETag"])

    def create(self, record: LeaseRecord) -> str | None:
        return self._put(record, IfNoneMatch="*")

    def swap(self, record: LeaseRecord, token: str) -> str | None:
        return self._put(record, IfMatch=token)


class _S3Settled:
    """The fallback for S3 stores without conditional writes: write, settle, read back, compare."""

    def __init__(self, storage: S3Storage, uri: str, *, settle_s: float | None = None) -> None:
        self.reader = _S3Conditional(storage, uri)
        self.storage, self.uri = storage, uri
        self.settle_s = SETTLE_S if settle_s is None else settle_s

    def read(self) -> tuple[LeaseRecord | None, str | None]:
        record, _ = self.reader.read()
        return record, (record.nonce if record else None)

    def _write_and_check(self, record: LeaseRecord) -> str | None:
        self.storage.write_bytes(self.uri, record.to_bytes())
        time.sleep(self.settle_s)
        found, token = self.read()
        return token if found is not None and found.nonce == record.nonce else None

    def create(self, record: LeaseRecord) -> str | None:
        if self.read()[0] is not None:
            return None
        return self._write_and_check(record)

    def swap(self, record: LeaseRecord, token: str) -> str | None:
        if self.read()[1] != token:
            return None
        return self._write_and_check(record)


class _LocalFiles:
    """A lease file on a local (or shared POSIX) filesystem, swapped under an O_EXCL lock file."""

    def __init__(self, storage: Storage, uri: str, lock_uri: str) -> None:
        self.storage, self.uri = storage, uri
        self.path, self.lock = local_path(uri), local_path(lock_uri)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 2 * STALE_LOCK_S
        while True:
            try:
                os.close(os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                try:
                    if time.time() - self.lock.stat().st_mtime > STALE_LOCK_S:
                        self.lock.unlink(missing_ok=True)  # its holder died between create and unlink
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise StorageError(f"cannot lock {self.lock}: it stays locked; remove it if no attempt runs") \
                        from None
                time.sleep(0.01)
            except OSError as exc:
                raise StorageError(f"cannot lock {self.lock}: {exc.strerror}") from None
        try:
            yield
        finally:
            self.lock.unlink(missing_ok=True)

    def read(self) -> tuple[LeaseRecord | None, str | None]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise StorageError(f"cannot read the lease {self.uri}: {exc.strerror}") from None
        record = LeaseRecord.from_bytes(raw, where=self.uri)
        return record, record.nonce

    def _write(self, record: LeaseRecord) -> str:
        self.storage.write_bytes(self.uri, record.to_bytes())  # a temporary file renamed into place
        return record.nonce

    def create(self, record: LeaseRecord) -> str | None:
        with self._locked():
            return None if self.path.exists() else self._write(record)

    def swap(self, record: LeaseRecord, token: str) -> str | None:
        with self._locked():
            return self._write(record) if self.read()[1] == token else None


def _status(exc: Any) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


_conditional_support: dict[tuple[str | None, str], bool] = {}
_support_lock = threading.Lock()


def supports_conditional_writes(storage: S3Storage, probe_uri: str) -> bool:
    """Whether the store refuses a `PutObject` with `If-None-Match: *` over an existing object.

    Learnt once per (endpoint, bucket) from a throw-away object: a store that ignores the header
    overwrites it instead of answering 412, and would do the same to a live lease.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(probe_uri)
    with _support_lock:
        known = _conditional_support.get((storage.endpoint_url, bucket))
    if known is not None:
        return known
    storage.write_bytes(probe_uri, b"probe\n")
    try:
        storage.client.put_object(Bucket=bucket, Key=key, Body=b"probe again\n", IfNoneMatch="*")
        supported = False
    except ClientError as exc:
        if _status(exc) in (409, 412):
            supported = True
        elif _status(exc) in (400, 501):  # InvalidArgument / NotImplemented: the header is not understood
            supported = False
        else:
            raise StorageError(f"cannot probe the store with {probe_uri}: S3 answered {_code(exc)}") from None
    except BotoCoreError as exc:
        raise StorageError(f"cannot probe the store with {probe_uri}: {exc}") from None
    finally:
        with contextlib.suppress(StorageError):
            storage.delete_prefix(probe_uri)
    with _support_lock:
        _conditional_support[(storage.endpoint_url, bucket)] = supported
    return supported


def open_store(storage: Storage, layout: RunLayout, *, conditional: bool | None = None) -> _Store:
    """The lease's compare-and-swap for `storage`; `conditional` forces (or rules out) S3 conditional writes."""
    if isinstance(storage, S3Storage):
        if conditional is None:
            conditional = supports_conditional_writes(storage, layout.lease_probe(uuid.uuid4().hex[:12]))
        return _S3Conditional(storage, layout.lease) if conditional else _S3Settled(storage, layout.lease)
    if isinstance(storage, LocalStorage):
        return _LocalFiles(storage, layout.lease, layout.lease_lock)
    raise StorageError(f"no lease is possible on {type(storage).__name__} ({layout.lease})")


# -- the lease -------------------------------------------------------------------------------------


def current_holder(storage: Storage, layout: RunLayout, *, clock: Clock = time.time) -> LeaseRecord | None:
    """The attempt that holds the run's lease now, or None when nobody does (absent, released, expired,
    or held by a process of this machine that is gone)."""
    # Reading needs no conditional writes: both S3 stores read alike, so no probe here.
    store = _S3Conditional(storage, layout.lease) if isinstance(storage, S3Storage) else open_store(storage, layout)
    record, _ = store.read()
    if record is None or not record.live(clock()) or record.process.known_dead():
        return None
    return record


def refuse_if_held(storage: Storage, layout: RunLayout, *, run: str, clock: Clock = time.time) -> None:
    """Raise LeaseHeld when a live attempt holds the run: for commands about to start a new one."""
    holder = current_holder(storage, layout, clock=clock)
    if holder is not None:
        raise LeaseHeld(_held_message(run, layout.lease, holder))


class Lease:
    """This attempt's hold on its run: renewed in the background, confirmed before every visible write."""

    def __init__(self, store: _Store, record: LeaseRecord, token: str, *, duration_s: float, clock: Clock,
                 previous: LeaseRecord | None) -> None:
        self.store, self.uri = store, store.uri
        self.record, self.token = record, token
        self.duration_s, self.clock = duration_s, clock
        self.previous = previous  # the record this attempt took over, if any
        self._lost_reason: str | None = None  # set once the lease is found to be someone else's
        self._lock = threading.Lock()  # one swap at a time: the renewer and confirm share the token
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def epoch(self) -> int:
        return self.record.epoch

    @property
    def owner(self) -> str:
        return self.record.owner

    @classmethod
    def acquire(cls, storage: Storage, layout: RunLayout, *, run: str, duration_s: float = LEASE_SECONDS,
                clock: Clock = time.time, conditional: bool | None = None, owner: str | None = None) -> Lease:
        """Take the run's lease: create it, or take it over (epoch + 1) from an attempt that released it,
        let it expire or died on this machine; LeaseHeld names a live holder and its expiry."""
        store = open_store(storage, layout, conditional=conditional)
        owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        process = Process.this()
        for _ in range(_ATTEMPTS):
            current, token = store.read()
            now = clock()
            record = LeaseRecord(run=run, owner=owner, epoch=(current.epoch + 1) if current else 1,
                                 expires_at=now + duration_s, renewed_at=now, process=process,
                                 nonce=uuid.uuid4().hex)
            if current is None:
                got = store.create(record)
            elif current.live(now) and not current.process.known_dead():
                raise LeaseHeld(_held_message(run, layout.lease, current))
            else:
                assert token is not None
                got = store.swap(record, token)
            if got is not None:
                return cls(store, record, got, duration_s=duration_s, clock=clock, previous=current)
        current, _ = store.read()
        if current is not None:
            raise LeaseHeld(_held_message(run, layout.lease, current))
        raise StorageError(f"cannot take the lease {layout.lease}: it kept changing under {_ATTEMPTS} attempts")

    def describe(self) -> str:
        """One line for the log: what was taken, and from whom."""
        line = f"lease of run '{self.record.run}' taken by {self.owner} at epoch {self.epoch} until {self.record.until}"
        prev = self.previous
        if prev is not None:
            why = ("released" if prev.released else "its process is gone" if prev.expires_at > self.record.renewed_at
                   else "expired")
            line += f" (from {prev.owner}, epoch {prev.epoch}: {why})"
        return line

    def _why_lost(self) -> str:
        try:
            current, _ = self.store.read()
        except StorageError:
            current = None
        now_held = (f"{current.owner} took it over at epoch {current.epoch}" if current is not None
                    and current.owner != self.owner else "it was removed or rewritten by someone else")
        return (f"this attempt ({self.owner}, epoch {self.epoch}) no longer holds the lease of run "
                f"'{self.record.run}' ({self.uri}); {now_held}")

    @property
    def lost(self) -> bool:
        return self._lost_reason is not None

    def _swap(self, record: LeaseRecord, action: str) -> None:
        """Replace our record by `record`, or remember why not and raise LeaseLost (caller holds the lock)."""
        if self._lost_reason is None:
            got = self.store.swap(record, self.token)
            if got is not None:
                self.record, self.token = record, got
                return
            self._lost_reason = self._why_lost()
        raise LeaseLost(f"refusing to {action}: {self._lost_reason}")

    def renew(self, action: str = "renew the lease") -> None:
        """Push the expiry `duration_s` ahead, if the lease is still ours (LeaseLost otherwise)."""
        with self._lock:
            now = self.clock()
            self._swap(replace(self.record, expires_at=now + self.duration_s, renewed_at=now,
                               nonce=uuid.uuid4().hex), action)

    def confirm(self, action: str) -> None:
        """Right before a write that must come from the run's one writer: renew, or refuse to `action`.

        A successful conditional renew proves the lease is ours at this moment and keeps it ours for
        `duration_s`, so the write that follows cannot land over a newer attempt's work.
        """
        self.renew(action)

    def raise_if_lost(self, action: str = "continue") -> None:
        """LeaseLost when a renewal found the lease taken over: the attempt must stop writing."""
        if self._lost_reason is not None:
            raise LeaseLost(f"refusing to {action}: {self._lost_reason}")

    def release(self) -> None:
        """Mark the lease released (a successor takes it at once); never touches a lease we lost."""
        self.stop_renewing()
        with self._lock:
            if self.lost:
                return
            now = self.clock()
            with contextlib.suppress(LeaseLost, StorageError):
                self._swap(replace(self.record, released=True, expires_at=now, renewed_at=now,
                                   nonce=uuid.uuid4().hex), "release the lease")

    # -- renewal in the background ---------------------------------------------------------------------
    def start_renewing(self, *, every_s: float = RENEW_EVERY_S, warn: Callable[[str], None] | None = None) -> None:
        """Renew every `every_s` on a daemon thread until released; a lost lease stops it (and is kept in
        for `raise_if_lost`), a storage error is reported through `warn` and retried."""

        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.renew()
                except LeaseLost:
                    return
                except StorageError as exc:
                    if warn is not None:
                        warn(f"lease renewal failed, retrying in {every_s:.0f}s: {exc}")

        self._renewer = threading.Thread(target=loop, name=f"lease {self.uri}", daemon=True)
        self._renewer.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
            self._renewer = None


class FencedStorage(Storage):
    """`inner`, with every write preceded by `lease.confirm`: for writers that must refuse once the run
    has a newer attempt (the adapter's files), whatever helper writes them."""

    def __init__(self, inner: Storage, lease: Lease, *, action: str) -> None:
        self.inner, self.lease, self.action = inner, lease, action

    def _confirm(self, uri: str) -> None:
        self.lease.confirm(f"{self.action} ({uri})")

    def read_bytes(self, uri: str) -> bytes:
        return self.inner.read_bytes(uri)

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        return self.inner.read_range(uri, start, length)

    def write_bytes(self, uri: str, data: bytes) -> ObjectInfo:
        self._confirm(uri)
        return self.inner.write_bytes(uri, data)

    def upload_file(self, path: str | Path, uri: str) -> ObjectInfo:
        self._confirm(uri)
        return self.inner.upload_file(path, uri)

    def download_file(self, uri: str, path: str | Path) -> None:
        self.inner.download_file(uri, path)

    def read_chunks(self, uri: str) -> Iterator[bytes]:
        return self.inner.read_chunks(uri)

    def list(self, prefix: str) -> list[ObjectInfo]:
        return self.inner.list(prefix)

    def stat(self, uri: str) -> ObjectInfo | None:
        return self.inner.stat(uri)

    def delete_prefix(self, prefix: str) -> int:
        self._confirm(prefix)
        return self.inner.delete_prefix(prefix)
