"""Object storage over `s3://` and local paths behind one small interface.

Every artifact of a run (shards, checkpoints, adapter, progress) goes through here, so the
trainer never needs a shared filesystem. `commit` is the one mechanism that makes a set of
objects visible: a marker (the data manifest, a checkpoint's commit marker) is written only after every
object it names is in place, and records each one's size and sha256 so readers can verify.

S3 calls ride through transient faults (5xx, SlowDown, reset connections, stalls) and give up on
a persistent outage in one sentence naming the URI, within a bound the environment sets:
`PIPELORA_S3_MAX_ATTEMPTS` (tries per request, default 5), `PIPELORA_S3_CONNECT_TIMEOUT` and
`PIPELORA_S3_READ_TIMEOUT` (seconds per try, defaults 10 and 60), `PIPELORA_S3_RETRY_MODE`
(botocore's mode, default `standard`). See `RetryPolicy`.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import urlparse

from pipelora.errors import PipeloraError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

P = ParamSpec("P")
T = TypeVar("T")

CHUNK = 8 * 1024 * 1024
READ_PIECE = 1024 * 1024  # S3 bodies are read in pieces this size: a broken body resumes from the last one
MULTIPART_THRESHOLD = 16 * 1024 * 1024
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes


class StorageError(PipeloraError):
    """One sentence naming the URI and what to do; never a raw botocore traceback."""


@dataclass(frozen=True)
class ObjectInfo:
    """An object as written or listed. `sha256` is known for what we wrote, not for listings."""

    uri: str
    size: int
    sha256: str | None = None


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto an s3://, file:// or plain-path base with exactly one '/' between."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def relative_name(base: str, uri: str) -> str:
    """`uri` relative to `base` (both in the same scheme), for names recorded inside markers."""
    base = base.rstrip("/") + "/"
    if not uri.startswith(base):
        raise ValueError(f"{uri} is not inside {base}")
    return uri[len(base) :]


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _file_chunks(path: str | Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def _digest(chunks: Iterable[bytes]) -> tuple[int, str]:
    """Size and sha256 of a stream of chunks: hashing never holds a whole object in memory."""
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    return _digest(_file_chunks(path))[1]


def check_against_marker(uri: str, *, size: int, sha256: str, meta: dict[str, Any], marker_uri: str) -> None:
    """Raise unless an object's size and sha256 are the ones its marker recorded."""
    if meta.get("size") is not None and int(meta["size"]) != size:
        raise StorageError(f"{uri} is {size} bytes but {marker_uri} recorded {meta['size']}; it was modified")
    if meta.get("sha256") and sha256 != meta["sha256"]:
        raise StorageError(f"{uri} does not match the sha256 recorded in {marker_uri}; it was modified")


class Storage:
    """Operations on full URIs of one scheme. Get one with `open_storage`."""

    # -- primitives each backend implements -------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        raise NotImplementedError

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        raise NotImplementedError

    def write_bytes(self, uri: str, data: bytes) -> ObjectInfo:
        raise NotImplementedError

    def upload_file(self, path: str | Path, uri: str) -> ObjectInfo:
        raise NotImplementedError

    def download_file(self, uri: str, path: str | Path) -> None:
        raise NotImplementedError

    def read_chunks(self, uri: str) -> Iterator[bytes]:
        """The object's bytes in pieces of at most CHUNK bytes, for whoever needs them only once."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix` (recursively), sorted by URI."""
        raise NotImplementedError

    def stat(self, uri: str) -> ObjectInfo | None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        raise NotImplementedError

    # -- built on the primitives -------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        return self.stat(uri) is not None

    def size(self, uri: str) -> int:
        info = self.stat(uri)
        if info is None:
            raise StorageError(f"{uri} does not exist")
        return info.size

    def read_json(self, uri: str) -> Any:
        raw = self.read_bytes(uri)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{uri} is not valid JSON ({exc.msg} at line {exc.lineno})") from None

    def write_json(self, uri: str, data: Any) -> ObjectInfo:
        return self.write_bytes(uri, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")

    def checksum(self, uri: str) -> ObjectInfo:
        """The object's size and sha256, streamed (a checkpoint shard can be larger than memory)."""
        size, sha256 = _digest(self.read_chunks(uri))
        return ObjectInfo(uri, size, sha256)

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """Names of the immediate sub-folders under `prefix` (derived from object keys)."""
        base = prefix.rstrip("/") + "/"
        names = {o.uri[len(base) :].split("/", 1)[0] for o in self.list(prefix) if "/" in o.uri[len(base) :]}
        return sorted(names)

    def commit(
        self, marker_uri: str, objects: Iterable[ObjectInfo], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write `marker_uri` naming `objects` (relative to the marker's folder) with sizes and sha256.

        Each object is checked to be present with the size that was written before the marker
        goes out, so a marker never names a missing or truncated object.
        """
        folder = marker_uri.rsplit("/", 1)[0]
        files: dict[str, dict[str, Any]] = {}
        for obj in objects:
            found = self.stat(obj.uri)
            if found is None or found.size != obj.size:
                got = "missing" if found is None else f"{found.size} bytes"
                raise StorageError(f"refusing to commit {marker_uri}: {obj.uri} is {got}, expected {obj.size} bytes")
            files[relative_name(folder, obj.uri)] = {"size": obj.size, "sha256": obj.sha256}
        marker = {**(extra or {}), "files": files}
        self.write_json(marker_uri, marker)
        return marker

    def read_marker(self, marker_uri: str) -> dict[str, Any] | None:
        """The commit marker's content, or None when the set was never committed."""
        if not self.exists(marker_uri):
            return None
        marker = self.read_json(marker_uri)
        if not isinstance(marker, dict):
            raise StorageError(f"{marker_uri} is not a commit marker (a JSON object); it was not written by pipelora")
        return marker

    def read_verified(self, marker_uri: str, marker: dict[str, Any], name: str) -> bytes:
        """The bytes of `name` (relative to the marker's folder), checked against the marker's record.

        The one place a committed object is checked against its marker: readers of checkpoints
        and shards go through here (or `check_against_marker` for files they hash themselves).
        """
        folder = marker_uri.rsplit("/", 1)[0]
        uri = join_uri(folder, name)
        meta = marker.get("files", {}).get(name)
        if meta is None:
            raise StorageError(f"{marker_uri} does not name {name}; it was committed by a different writer")
        data = self.read_bytes(uri)
        check_against_marker(uri, size=len(data), sha256=hashlib.sha256(data).hexdigest(), meta=meta,
                             marker_uri=marker_uri)
        return data

    def verify_committed(self, marker_uri: str) -> dict[str, Any]:
        """Check every object a marker names by size and sha256 (streamed); raise on the first mismatch."""
        marker = self.read_marker(marker_uri)
        if marker is None:
            raise StorageError(f"{marker_uri} does not exist: nothing was committed there")
        folder = marker_uri.rsplit("/", 1)[0]
        for name, meta in marker.get("files", {}).items():
            uri = join_uri(folder, name)
            size, sha256 = _digest(self.read_chunks(uri))
            check_against_marker(uri, size=size, sha256=sha256, meta=meta, marker_uri=marker_uri)
        return marker


# -- local paths ---------------------------------------------------------------------------------


def local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        return Path(parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost") else Path(parsed.path)
    return Path(uri)


class LocalStorage(Storage):
    """Plain files; writes go to a temporary file first and are renamed into place (atomic)."""

    def _path(self, uri: str) -> Path:
        return local_path(uri)

    def _uri(self, like: str, path: Path) -> str:
        return f"file://{path}" if like.startswith("file://") else str(path)

    def read_bytes(self, uri: str) -> bytes:
        try:
            return self._path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{uri} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror}") from None

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(uri), "rb") as fh:
                fh.seek(start)
                return fh.read(length)
        except FileNotFoundError:
            raise StorageError(f"{uri} does not exist") from None

    def _atomic_target(self, uri: str) -> Path:
        path = self._path(uri)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the folder for {uri}: {exc.strerror}") from None
        return path

    def write_bytes(self, uri: str, data: bytes) -> ObjectInfo:
        path = self._atomic_target(uri)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write {uri}: {exc.strerror}") from None
        return ObjectInfo(uri, len(data), hashlib.sha256(data).hexdigest())

    def upload_file(self, path: str | Path, uri: str) -> ObjectInfo:
        target = self._atomic_target(uri)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write {uri}: {exc.strerror}") from None
        return ObjectInfo(uri, target.stat().st_size, sha256_file(target))

    def download_file(self, uri: str, path: str | Path) -> None:
        source = self._path(uri)
        if not source.exists():
            raise StorageError(f"{uri} does not exist")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def read_chunks(self, uri: str) -> Iterator[bytes]:
        path = self._path(uri)
        if not path.is_file():
            raise StorageError(f"{uri} does not exist")
        try:
            yield from _file_chunks(path)
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror}") from None

    def list(self, prefix: str) -> list[ObjectInfo]:
        root = self._path(prefix)
        if root.is_file():
            return [ObjectInfo(prefix, root.stat().st_size)]
        if not root.is_dir():
            return []
        out: builtins.list[ObjectInfo] = []
        for path in root.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                out.append(ObjectInfo(self._uri(prefix, path), path.stat().st_size))
        return sorted(out, key=lambda o: o.uri)

    def stat(self, uri: str) -> ObjectInfo | None:
        path = self._path(uri)
        return ObjectInfo(uri, path.stat().st_size) if path.is_file() else None

    def delete_prefix(self, prefix: str) -> int:
        root = self._path(prefix)
        if root.is_file():
            root.unlink()
            return 1
        if not root.is_dir():
            return 0
        count = sum(1 for p in root.rglob("*") if p.is_file())
        shutil.rmtree(root)
        return count


# -- S3 ----------------------------------------------------------------------------------------


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


RETRY_MODES = ("standard", "adaptive", "legacy")


def _env_number(name: str, default: float, *, whole: bool, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = minimum - 1
    if not value >= minimum:  # also refuses nan
        kind = "a whole number" if whole else "a number of seconds"
        raise StorageError(f"{name} must be {kind} of at least {minimum:g}, not '{raw}'; fix or unset it")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one S3 call tries before it gives up, read from the environment once per client.

    Every request gets `attempts` tries (botocore's retry mode: exponential backoff with jitter
    on 5xx, throttling and broken connections), and each attempt waits at most `connect_timeout`
    to connect and `read_timeout` between two received bytes, so a stalled store never hangs a
    rank: a call that cannot succeed ends after about attempts x (timeout + backoff). What
    botocore cannot retry (a response body that breaks or ends short after the call returned) is
    retried here with the same budget and the same kind of backoff.
    """

    attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    mode: str = "standard"
    backoff_base: float = 0.1  # seconds; doubled per attempt, full jitter
    backoff_cap: float = 20.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        mode = os.environ.get("PIPELORA_S3_RETRY_MODE", "").strip() or cls.mode
        if mode not in RETRY_MODES:
            raise StorageError(f"PIPELORA_S3_RETRY_MODE must be one of {', '.join(RETRY_MODES)}, not '{mode}'")
        return cls(
            attempts=int(_env_number("PIPELORA_S3_MAX_ATTEMPTS", cls.attempts, whole=True, minimum=1)),
            connect_timeout=_env_number("PIPELORA_S3_CONNECT_TIMEOUT", cls.connect_timeout, whole=False, minimum=0.1),
            read_timeout=_env_number("PIPELORA_S3_READ_TIMEOUT", cls.read_timeout, whole=False, minimum=0.1),
            mode=mode,
        )

    def pause(self, failures: int) -> None:
        """Sleep before the next try after `failures` failed ones: uniform in [0, base x 2^(failures-1)]."""
        time.sleep(random.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** max(failures - 1, 0))))


class _ShortBody(Exception):
    """A response body that ended before its Content-Length (or a file shorter than the object)."""

    def __init__(self, got: int, expected: int) -> None:
        super().__init__(f"got {got} of {expected} bytes")


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What reading a response body raises when the connection breaks, stalls or ends short (and
    `_ShortBody`, which the readers here raise for a body that ended early without an error)."""
    import http.client

    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as URLLib3Error

    return (_ShortBody, ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError,
            URLLib3Error, http.client.HTTPException, ConnectionError, TimeoutError)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class S3Storage(Storage):
    """boto3 with the standard credential chain, retries with backoff (`RetryPolicy`) and concurrent multipart."""

    def __init__(self, *, endpoint_url: str | None = None, region: str | None = None,
                 policy: RetryPolicy | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.endpoint_url = endpoint_url
        # What this client learnt about buckets belongs to its endpoint: never shared between instances.
        self._known_buckets: set[str] = set()
        self._bucket_lock = threading.Lock()
        self.policy = policy or RetryPolicy.from_env()
        config = Config(
            # "standard": backoff per request; "adaptive" would also slow every later request of the
            # process after one SlowDown (opt in with PIPELORA_S3_RETRY_MODE).
            retries={"mode": self.policy.mode, "total_max_attempts": self.policy.attempts},  # type: ignore[arg-type]
            connect_timeout=self.policy.connect_timeout,
            read_timeout=self.policy.read_timeout,
            max_pool_connections=32,
        )
        session = boto3.session.Session()
        self.client: S3Client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=CHUNK * 2, max_concurrency=8,
            num_download_attempts=self.policy.attempts,
        )

    def _error(self, exc: BaseException, uri: str, action: str) -> StorageError:
        """Turn a botocore failure into one sentence naming the URI and the likely fix."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ProxyConnectionError,
            ReadTimeoutError,
        )

        bucket, _ = split_s3(uri)
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        endpoint = self.endpoint_url or "AWS"
        tries = f"tried up to {self.policy.attempts} times"
        if isinstance(exc, (S3UploadFailedError, RetriesExceededError)):
            # boto3's transfer wrappers: the cause is the botocore error underneath.
            cause = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__
            if isinstance(cause, BaseException) and cause is not exc:
                return self._error(cause, uri, action)
            return StorageError(f"cannot {action} {uri}: {_one_line(exc)}{where}")
        if isinstance(exc, NoCredentialsError):
            return StorageError(
                f"cannot {action} {uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or AWS_PROFILE (on Kubernetes, through the cluster.s3_secret Secret)"
            )
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            meta = exc.response.get("ResponseMetadata", {})
            status = meta.get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StorageError(f"cannot {action} {uri}: bucket '{bucket}' does not exist{where}; create it or fix the URI")
            if code in ("NoSuchKey", "404") or status == 404:
                return StorageError(f"{uri} does not exist")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
                return StorageError(
                    f"cannot {action} {uri}: access denied ({code}){where}; check the credentials and the bucket policy"
                )
            if code == "PreconditionFailed" or status == 412:
                return StorageError(f"cannot {action} {uri}: it changed while it was being read; read it again")
            if isinstance(status, int) and (status >= 500 or status == 429) or code in ("SlowDown", "Throttling"):
                answered = f"{code} ({status})" if code and code != str(status) else str(status)
                attempts = int(meta.get("RetryAttempts", 0)) + 1
                return StorageError(
                    f"cannot {action} {uri}: S3 answered {answered}{where} to all {attempts} attempts; "
                    "the store is failing or throttling: retry later, or allow more attempts with "
                    "PIPELORA_S3_MAX_ATTEMPTS"
                )
            return StorageError(f"cannot {action} {uri}: S3 answered {code or status}{where}")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError)):
            return StorageError(
                f"cannot {action} {uri}: S3 endpoint {endpoint} is unreachable; "
                "check storage.endpoint_url and the network"
            )
        if isinstance(exc, ReadTimeoutError):
            return StorageError(
                f"cannot {action} {uri}: S3 endpoint {endpoint} did not answer within "
                f"{self.policy.read_timeout:g}s ({tries}); check the store, or raise PIPELORA_S3_READ_TIMEOUT "
                "or PIPELORA_S3_MAX_ATTEMPTS"
            )
        if isinstance(exc, ConnectionClosedError):
            return StorageError(
                f"cannot {action} {uri}: S3 endpoint {endpoint} closed the connection before answering ({tries}); "
                "check the network and the store, or raise PIPELORA_S3_MAX_ATTEMPTS"
            )
        if isinstance(exc, _stream_errors()):
            return StorageError(
                f"cannot {action} {uri}: the connection to S3 endpoint {endpoint} broke ({_one_line(exc)}; "
                f"{tries}); check the network and the store, or raise PIPELORA_S3_MAX_ATTEMPTS"
            )
        return StorageError(f"cannot {action} {uri}: {_one_line(exc)}")

    def _call(self, action: str, uri: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise self._error(exc, uri, action) from None

    def _broken_body(self, uri: str, failures: int, exc: BaseException) -> None:
        """A body read failed (`failures` in a row): pause before the next try, or give up in one sentence."""
        if failures >= self.policy.attempts:
            endpoint = self.endpoint_url or "AWS"
            raise StorageError(
                f"cannot read {uri}: the response body from S3 endpoint {endpoint} broke off in "
                f"{failures} attempts in a row (last: {_one_line(exc)}); check the network and the store, "
                "or raise PIPELORA_S3_MAX_ATTEMPTS"
            ) from None
        self.policy.pause(failures)

    def _stream(self, uri: str, first: int = 0, last: int | None = None) -> Iterator[bytes]:
        """Bytes `first`..`last` (inclusive; None: to the end) of the object, in pieces.

        botocore retries a request, not the body that follows its headers: a body that breaks
        off, stalls or ends short is resumed here where it stopped, with a ranged GET pinned to
        the first answer's ETag (two versions of an object are never spliced). Failures in a row
        without progress are bounded by the retry policy's attempts.
        """
        bucket, key = split_s3(uri)
        pos, end, etag, failures = first, -1, "", 0
        while end < 0 or pos < end:
            extra: dict[str, str] = {}
            if pos or last is not None:
                extra["Range"] = f"bytes={pos}-{'' if last is None else last}"
            if etag:
                extra["IfMatch"] = etag
            resp = self._call("read", uri, self.client.get_object, Bucket=bucket, Key=key, **extra)  # type: ignore[arg-type]
            answered = str(resp.get("ContentRange", ""))
            if "Range" in extra and not answered and end < 0 and int(resp["ContentLength"]) == 0:
                resp["Body"].close()  # an empty object: stores answer a range of it with no range
                return
            if "Range" in extra and not answered.startswith(f"bytes {pos}-"):
                resp["Body"].close()
                raise StorageError(
                    f"cannot read {uri}: S3 endpoint {self.endpoint_url or 'AWS'} ignored the byte range "
                    f"{extra['Range']} (it answered {resp.get('ContentRange') or 'the whole object'}); "
                    "use an S3 store that serves ranged GETs"
                )
            if end < 0:
                end, etag = pos + int(resp["ContentLength"]), resp.get("ETag", "")
            body, began = resp["Body"], pos
            try:
                while pos < end:
                    try:
                        piece = body.read(min(CHUNK, READ_PIECE))
                        if not piece:
                            raise _ShortBody(pos - first, end - first)
                    except _stream_errors() as exc:
                        # The budget is for answers in a row that brought nothing.
                        failures = 0 if pos > began else failures + 1
                        self._broken_body(uri, failures, exc)
                        break
                    pos += len(piece)
                    yield piece
            finally:
                body.close()

    def read_bytes(self, uri: str) -> bytes:
        return b"".join(self._stream(uri))

    def read_range(self, uri: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return b"".join(self._stream(uri, start, start + length - 1))

    def write_bytes(self, uri: str, data: bytes) -> ObjectInfo:
        bucket, key = split_s3(uri)
        # A reset or timed-out request is sent again by botocore (the body is rewound); S3 makes an
        # object visible only whole, so a retried put never leaves it short.
        if len(data) >= MULTIPART_THRESHOLD:
            self._call("write", uri, self.client.upload_fileobj, io.BytesIO(data), bucket, key, Config=self.transfer)
        else:
            self._call("write", uri, self.client.put_object, Bucket=bucket, Key=key, Body=data)
        return ObjectInfo(uri, len(data), hashlib.sha256(data).hexdigest())

    def upload_file(self, path: str | Path, uri: str) -> ObjectInfo:
        bucket, key = split_s3(uri)
        digest = sha256_file(path)
        self._call("write", uri, self.client.upload_file, str(path), bucket, key, Config=self.transfer)
        return ObjectInfo(uri, Path(path).stat().st_size, digest)

    def download_file(self, uri: str, path: str | Path) -> None:
        """Concurrent ranged GETs (s3transfer restarts a part whose body breaks, up to the attempts);
        the file must then hold as many bytes as the object, or it is fetched again."""
        from boto3.s3.transfer import create_transfer_manager
        from s3transfer.exceptions import RetriesExceededError

        bucket, key = split_s3(uri)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.part"
        failures = 0
        while True:
            with create_transfer_manager(self.client, self.transfer) as manager:
                future = manager.download(bucket, key, tmp)
                try:
                    self._call("read", uri, future.result)
                except StorageError:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                except RetriesExceededError as exc:
                    Path(tmp).unlink(missing_ok=True)
                    raise self._error(getattr(exc, "last_exception", None) or exc, uri, "read") from None
                expected = future.meta.size
            got = Path(tmp).stat().st_size
            if expected is None or got == expected:
                break
            Path(tmp).unlink(missing_ok=True)
            failures += 1
            self._broken_body(uri, failures, _ShortBody(got, expected))
        os.replace(tmp, path)

    def read_chunks(self, uri: str) -> Iterator[bytes]:
        return self._stream(uri)

    def list(self, prefix: str) -> list[ObjectInfo]:
        bucket, key = split_s3(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        out: list[ObjectInfo] = []
        folder = key.rstrip("/")
        pages = self._call("list", prefix, lambda: list(paginator.paginate(Bucket=bucket, Prefix=key)))
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"]
                # A prefix means a folder (or the object itself), never a sibling sharing its first letters.
                if folder and name != folder and not name.startswith(folder + "/"):
                    continue
                out.append(ObjectInfo(f"s3://{bucket}/{name}", int(item["Size"])))
        return sorted(out, key=lambda o: o.uri)

    def stat(self, uri: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if (status == 404 or code in ("404", "NoSuchKey")) and code != "NoSuchBucket":
                # HEAD has no body, so a missing bucket also reads 404: tell them apart once.
                self._require_bucket(bucket, uri)
                return None
            raise self._error(exc, uri, "read") from None
        except Exception as exc:  # botocore connection errors
            raise self._error(exc, uri, "read") from None
        return ObjectInfo(uri, int(head["ContentLength"]))

    def _require_bucket(self, bucket: str, uri: str) -> None:
        with self._bucket_lock:
            if bucket in self._known_buckets:
                return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except BotoCoreError as exc:
            raise self._error(exc, uri, "read") from None
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                where = f" at {self.endpoint_url}" if self.endpoint_url else ""
                raise StorageError(
                    f"cannot read {uri}: bucket '{bucket}' does not exist{where}; create it or fix the URI"
                ) from None
            raise self._error(exc, uri, "read") from None
        with self._bucket_lock:
            self._known_buckets.add(bucket)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; raise naming the keys S3 refused (DeleteObjects reports
        per-key failures in a successful response, so they are read, not assumed away)."""
        bucket, _ = split_s3(prefix)
        objects = self.list(prefix)
        refused: builtins.list[str] = []
        for start in range(0, len(objects), DELETE_BATCH):
            batch: builtins.list[ObjectIdentifierTypeDef] = [
                {"Key": split_s3(o.uri)[1]} for o in objects[start : start + DELETE_BATCH]
            ]
            resp = self._call("delete", prefix, self.client.delete_objects, Bucket=bucket, Delete={"Objects": batch})
            refused += [f"{e.get('Key', '?')} ({e.get('Code', 'error')})" for e in resp.get("Errors", [])]
        if refused:
            shown = ", ".join(refused[:10]) + (f" and {len(refused) - 10} more" if len(refused) > 10 else "")
            raise StorageError(
                f"cannot delete {len(refused)} of {len(objects)} objects under {prefix}: {shown}; "
                "check the credentials, the bucket policy and object locks"
            )
        return len(objects)


# S3 backends are shared per (endpoint_url, region): boto3 clients are thread-safe, and a client
# with what it learnt about buckets belongs to exactly one endpoint, so two endpoints never share state.
_cache: dict[tuple[str | None, str | None], S3Storage] = {}
_cache_lock = threading.Lock()


def open_storage(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> Storage:
    """The backend for `uri`'s scheme; one S3 backend per (endpoint_url, region)."""
    if not is_s3(uri):
        return LocalStorage()
    key = (endpoint_url, region)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = S3Storage(endpoint_url=endpoint_url, region=region)
        return _cache[key]


def storage_for(spec: Any, uri: str | None = None) -> Storage:
    """The backend for a URI of a job spec's run (endpoint and region come from `spec.storage`)."""
    return open_storage(uri or spec.storage.uri, endpoint_url=spec.storage.endpoint_url, region=spec.storage.region)
