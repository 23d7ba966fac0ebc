"""Every storage operation through the fault proxy, one fault kind at a time: each result equals the
fault-free one, objects on the server are whole, and a persistent outage ends a call with one
sentence naming the URI after the configured attempts."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from s3faults import KINDS, RESPONSE_KINDS, FaultProxy

from pipelora.storage import READ_PIECE, RetryPolicy, S3Storage, StorageError, relative_name

pytestmark = pytest.mark.slow

READ_TIMEOUT_S = 1.0
DELAY_S = 1.5  # past the read timeout
# Attempts to spare over the one failure per request the proxy injects here, for a legitimate
# answer slower than the short read timeout on a loaded machine.
POLICY = RetryPolicy(attempts=4, connect_timeout=2.0, read_timeout=READ_TIMEOUT_S)
BIG = 12 * 1024 * 1024 + 4321  # three multipart parts, three ranged download parts


def _payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _store(endpoint: str) -> S3Storage:
    """A client with small multipart parts (5 MiB, the S3 minimum), so a 12 MiB file takes three."""
    from boto3.s3.transfer import TransferConfig

    store = S3Storage(endpoint_url=endpoint, policy=POLICY)
    store.transfer = TransferConfig(multipart_threshold=6 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024,
                                    max_concurrency=4, num_download_attempts=POLICY.attempts)
    return store


def exercise(store: S3Storage, root: str, src: Path, scratch: Path) -> dict[str, Any]:
    """Every operation once; results as comparable values (URIs relative to `root`, bytes as sha256)."""

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def rel(uri: str) -> str:
        return relative_name(root, uri)

    out: dict[str, Any] = {}
    small = _payload(3 * READ_PIECE + 123, 1)  # several read pieces: a cut body resumes mid-object
    small_uri, big_uri = f"{root}/obj/small.bin", f"{root}/obj/big.bin"
    info = store.write_bytes(small_uri, small)
    out["write_bytes"] = (rel(info.uri), info.size, info.sha256)
    out["read_bytes"] = sha(store.read_bytes(small_uri))
    out["read_range"] = [sha(store.read_range(small_uri, start, length))
                         for start, length in ((0, 10), (READ_PIECE - 5, 2 * READ_PIECE), (len(small) - 7, 100))]
    info = store.upload_file(src, big_uri)
    out["upload_file"] = (rel(info.uri), info.size, info.sha256)
    store.download_file(big_uri, scratch / "big.bin")
    out["download_file"] = sha((scratch / "big.bin").read_bytes())
    out["read_chunks"] = sha(b"".join(store.read_chunks(big_uri)))
    big_info, missing = store.stat(big_uri), store.stat(f"{root}/obj/missing.bin")
    out["stat"] = (big_info.size if big_info else None, missing)
    out["list"] = [(rel(o.uri), o.size) for o in store.list(f"{root}/obj")]
    parts = [store.write_bytes(f"{root}/ck/part-{i}.bin", _payload(1000 * i, i)) for i in range(1, 4)]
    out["commit"] = store.commit(f"{root}/ck/COMMITTED", parts, extra={"step": 2})
    out["verify_committed"] = store.verify_committed(f"{root}/ck/COMMITTED")
    out["delete_prefix"] = store.delete_prefix(f"{root}/ck")
    out["after_delete"] = store.list(f"{root}/ck")
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults-src") / "big.bin"
    path.write_bytes(_payload(BIG, 7))
    return path


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    name = "storage-faults"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def fault_free(s3_endpoint: str, bucket: str, source: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Any]:
    return exercise(_store(s3_endpoint), f"s3://{bucket}/clean", source, tmp_path_factory.mktemp("clean"))


@pytest.mark.parametrize("kind", KINDS)
def test_each_fault_kind_alone_changes_no_result(kind: str, make_proxy: Callable[..., FaultProxy],
                                                 s3_endpoint: str, bucket: str, source: Path,
                                                 fault_free: dict[str, Any], tmp_path: Path) -> None:
    # Every request fails once before it gets through. Not twice: botocore's retry quota (a circuit
    # breaker per client) refunds a retry's cost only to a request that then succeeds, so a client
    # whose every request fails twice runs dry after a few dozen requests, by design.
    proxy = make_proxy(kinds=[kind], rate=1.0, seed=3, delay_s=DELAY_S, max_streak=1)
    root = f"s3://{bucket}/{kind}"
    assert exercise(_store(proxy.url), root, source, tmp_path) == fault_free
    assert set(proxy.counts) == {kind}
    faulted = {i.key.split(" ")[0] for i in proxy.injected}
    if kind in RESPONSE_KINDS:
        assert faulted == {"GET"} and proxy.counts[kind] >= 10
    else:
        assert faulted == {"GET", "HEAD", "PUT", "POST"} and proxy.counts[kind] >= 25
    # What the server holds is whole: no retried upload left a part missing or an object short.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    stored = s3.get_object(Bucket=bucket, Key=f"{kind}/obj/big.bin")["Body"].read()
    assert stored == source.read_bytes()
    assert s3.list_multipart_uploads(Bucket=bucket, Prefix=f"{kind}/").get("Uploads", []) == []


OUTAGE_SENTENCES = {
    "slowdown-503": "S3 answered SlowDown (503) at {endpoint} to all 4 attempts; the store is failing or throttling",
    "error-500": "S3 answered InternalError (500) at {endpoint} to all 4 attempts; the store is failing or throttling",
    "reset-request": "S3 endpoint {endpoint} closed the connection before answering (tried up to 4 times)",
    "delay": "S3 endpoint {endpoint} did not answer within 1s (tried up to 4 times)",
    "reset-response": "the response body from S3 endpoint {endpoint} broke off in 4 attempts in a row",
    "stall-response": "the response body from S3 endpoint {endpoint} broke off in 4 attempts in a row",
}


ERROR_STATUS = {"slowdown-503": 503, "error-500": 500}


@pytest.mark.timeout(300)  # a hang guard, not a performance bound
@pytest.mark.parametrize("kind", [*OUTAGE_SENTENCES, "server-gone"])
def test_a_persistent_outage_ends_each_call_in_one_sentence_after_the_attempts(
        kind: str, make_proxy: Callable[..., FaultProxy], s3_endpoint: str, bucket: str) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").put_object(
        Bucket=bucket, Key="outage/existing", Body=b"abc")
    proxy = make_proxy(outage=None if kind == "server-gone" else kind, delay_s=DELAY_S)
    store = S3Storage(endpoint_url=proxy.url, policy=POLICY)
    endpoint = proxy.url
    if kind == "server-gone":
        proxy.close()
    uri = f"s3://{bucket}/outage/existing"
    calls: list[tuple[str, str, Callable[[], object]]] = [("read", "GET", lambda: store.read_bytes(uri))]
    if kind not in RESPONSE_KINDS:  # response faults only cut bodies: writes and HEADs pass
        calls += [("write", "PUT", lambda: store.write_bytes(uri, b"new")),
                  ("read", "HEAD", lambda: store.exists(uri))]
    for action, method, call in calls:
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"cannot {action} {uri}: ") and "\n" not in message, message
        if kind == "server-gone":
            assert message.endswith(f"S3 endpoint {endpoint} is unreachable; check storage.endpoint_url and the network")
            continue
        expected = OUTAGE_SENTENCES[kind]
        if method == "HEAD" and kind in ERROR_STATUS:  # a HEAD answer has no body, so no error code
            expected = f"S3 answered {ERROR_STATUS[kind]} at {{endpoint}} to all 4 attempts"
        assert expected.format(endpoint=endpoint) in message, message
        assert proxy.attempts(method, f"/{bucket}/outage/existing") == POLICY.attempts  # bounded, exactly
        proxy.reset_counts()
    boto3_client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert boto3_client.get_object(Bucket=bucket, Key="outage/existing")["Body"].read() == b"abc"
