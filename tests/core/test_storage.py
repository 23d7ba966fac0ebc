"""Object storage: the same behaviour over a real moto S3 server and over local paths."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from net import free_port

from pipelora.storage import ObjectInfo, Storage, StorageError, join_uri, open_storage


@pytest.fixture(params=["s3", "local", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Storage, str]:
    """(storage, root URI) for each backend; tests use only URIs under the root."""
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        return open_storage("s3://x", endpoint_url=endpoint), f"s3://{bucket}/root"
    if request.param == "file":
        return open_storage("file:///"), f"file://{tmp_path}/root"
    return open_storage(str(tmp_path)), str(tmp_path / "root")


def test_bytes_round_trip_reports_size_and_sha(store: tuple[Storage, str]) -> None:
    s, root = store
    uri = join_uri(root, "a", "b.bin")
    info = s.write_bytes(uri, b"hello world")
    assert info == ObjectInfo(uri, 11, hashlib.sha256(b"hello world").hexdigest())
    assert s.read_bytes(uri) == b"hello world"
    assert s.exists(uri) and s.size(uri) == 11
    assert not s.exists(join_uri(root, "a", "missing"))


def test_ranged_read(store: tuple[Storage, str]) -> None:
    s, root = store
    uri = join_uri(root, "range.bin")
    s.write_bytes(uri, bytes(range(256)))
    assert s.read_range(uri, 10, 5) == bytes([10, 11, 12, 13, 14])
    assert s.read_range(uri, 250, 100) == bytes(range(250, 256))
    assert s.read_range(uri, 0, 0) == b""


def test_listing_is_recursive_sorted_and_scoped_to_the_folder(store: tuple[Storage, str]) -> None:
    s, root = store
    for name in ["run/b.txt", "run/a/x.txt", "run/a/y.txt", "runner/z.txt"]:
        s.write_bytes(join_uri(root, name), name.encode())
    listed = s.list(join_uri(root, "run"))
    assert [o.uri for o in listed] == [join_uri(root, n) for n in ["run/a/x.txt", "run/a/y.txt", "run/b.txt"]]
    assert [o.size for o in listed] == [len("run/a/x.txt"), len("run/a/y.txt"), len("run/b.txt")]
    assert s.list_dirs(join_uri(root, "run")) == ["a"]
    assert s.list(join_uri(root, "nothing-here")) == []


def test_delete_prefix_removes_only_that_folder(store: tuple[Storage, str]) -> None:
    s, root = store
    for name in ["ck/step-1/a", "ck/step-1/b", "ck/step-2/a"]:
        s.write_bytes(join_uri(root, name), b"x")
    assert s.delete_prefix(join_uri(root, "ck/step-1")) == 2
    assert [o.uri for o in s.list(join_uri(root, "ck"))] == [join_uri(root, "ck/step-2/a")]


def test_file_upload_and_download(store: tuple[Storage, str], tmp_path: Path) -> None:
    s, root = store
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    info = s.upload_file(src, join_uri(root, "up.bin"))
    assert info.size == 3000 and info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    dst = tmp_path / "out" / "dst.bin"
    s.download_file(join_uri(root, "up.bin"), dst)
    assert dst.read_bytes() == src.read_bytes()


def test_commit_marker_records_sizes_and_sha_and_is_written_last(store: tuple[Storage, str]) -> None:
    s, root = store
    folder = join_uri(root, "checkpoints", "step-00000010")
    objects = [s.write_bytes(join_uri(folder, f"stage-{i}.bin"), bytes([i]) * (i + 1)) for i in range(3)]
    marker = join_uri(folder, "COMMITTED")
    assert s.read_marker(marker) is None
    written = s.commit(marker, objects, extra={"step": 10})
    assert s.read_json(marker) == written
    assert written["step"] == 10
    assert written["files"] == {
        f"stage-{i}.bin": {"size": i + 1, "sha256": hashlib.sha256(bytes([i]) * (i + 1)).hexdigest()} for i in range(3)
    }
    assert s.verify_committed(marker)["step"] == 10


def test_commit_refuses_when_a_named_object_is_missing(store: tuple[Storage, str]) -> None:
    s, root = store
    folder = join_uri(root, "data")
    present = s.write_bytes(join_uri(folder, "train-00000.safetensors"), b"abc")
    ghost = ObjectInfo(join_uri(folder, "train-00001.safetensors"), 5, "0" * 64)
    marker = join_uri(folder, "manifest.json")
    with pytest.raises(StorageError, match="train-00001.safetensors is missing"):
        s.commit(marker, [present, ghost])
    assert not s.exists(marker)


def test_commit_refuses_a_truncated_object(store: tuple[Storage, str]) -> None:
    s, root = store
    info = s.write_bytes(join_uri(root, "d", "x"), b"abcdef")
    s.write_bytes(info.uri, b"abc")
    with pytest.raises(StorageError, match="is 3 bytes, expected 6 bytes"):
        s.commit(join_uri(root, "d", "COMMITTED"), [info])


def test_verify_detects_a_modified_object(store: tuple[Storage, str]) -> None:
    s, root = store
    info = s.write_bytes(join_uri(root, "v", "x"), b"abcdef")
    s.commit(join_uri(root, "v", "COMMITTED"), [info])
    s.write_bytes(info.uri, b"abcdeF")
    with pytest.raises(StorageError, match="does not match the sha256"):
        s.verify_committed(join_uri(root, "v", "COMMITTED"))


def test_json_helpers_and_invalid_json(store: tuple[Storage, str]) -> None:
    s, root = store
    s.write_json(join_uri(root, "p.json"), {"step": 3})
    assert s.read_json(join_uri(root, "p.json")) == {"step": 3}
    s.write_bytes(join_uri(root, "bad.json"), b"{nope")
    with pytest.raises(StorageError, match="is not valid JSON"):
        s.read_json(join_uri(root, "bad.json"))


def test_reading_a_missing_object_names_it(store: tuple[Storage, str]) -> None:
    s, root = store
    uri = join_uri(root, "missing.bin")
    with pytest.raises(StorageError) as info:
        s.read_bytes(uri)
    assert str(info.value) == f"{uri} does not exist"


def test_multipart_upload_of_40_mb(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    s = open_storage("s3://x", endpoint_url=s3_endpoint)
    src = tmp_path / "big.bin"
    payload = os.urandom(40 * 1024 * 1024)
    src.write_bytes(payload)
    uri = f"s3://{s3_bucket}/big/big.bin"
    info = s.upload_file(src, uri)
    assert info.size == len(payload) and s.size(uri) == len(payload)
    # S3 marks multipart objects with an ETag of the form "<md5 of part md5s>-<parts>".
    etag = s.client.head_object(Bucket=s3_bucket, Key="big/big.bin")["ETag"].strip('"')
    assert etag.endswith("-3")
    assert s.read_range(uri, 20 * 1024 * 1024, 16) == payload[20 * 1024 * 1024 : 20 * 1024 * 1024 + 16]
    s.write_bytes(f"s3://{s3_bucket}/big/bytes.bin", payload)
    assert hashlib.sha256(s.read_bytes(f"s3://{s3_bucket}/big/bytes.bin")).digest() == hashlib.sha256(payload).digest()


def test_missing_bucket_is_one_sentence(s3_endpoint: str) -> None:
    s = open_storage("s3://x", endpoint_url=s3_endpoint)
    for action in (lambda: s.read_bytes("s3://no-such-bucket/a"), lambda: s.exists("s3://no-such-bucket/a"),
                   lambda: s.write_bytes("s3://no-such-bucket/a", b"x")):
        with pytest.raises(StorageError) as info:
            action()
        message = str(info.value)
        assert "bucket 'no-such-bucket' does not exist" in message and "s3://no-such-bucket/a" in message
        assert "\n" not in message


def test_unreachable_endpoint_is_one_sentence() -> None:
    from pipelora.storage import S3Storage

    port = free_port()
    s = S3Storage(endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError) as info:
        s.read_bytes("s3://bucket/key")
    assert str(info.value) == (
        f"cannot read s3://bucket/key: S3 endpoint http://127.0.0.1:{port} is unreachable; "
        "check storage.endpoint_url and the network"
    )


def test_access_denied_names_the_uri(s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto enforces bucket policies: an explicit Deny gives the real 403 AccessDenied."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
                       "Resource": f"arn:aws:s3:::{s3_bucket}/*"}],
    }
    client.put_object(Bucket=s3_bucket, Key="secret", Body=b"x")
    client.put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps(policy))
    from pipelora.storage import S3Storage

    s = S3Storage(endpoint_url=s3_endpoint)
    try:
        with pytest.raises(StorageError) as info:
            s.read_bytes(f"s3://{s3_bucket}/secret")
    finally:
        client.delete_bucket_policy(Bucket=s3_bucket)
    assert "access denied" in str(info.value) and f"s3://{s3_bucket}/secret" in str(info.value)


@pytest.fixture(scope="module")
def second_s3_endpoint(wait_for_port) -> Iterator[str]:
    """Another moto server: an endpoint with buckets of its own."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for_port(port, proc, timeout=60):
            raise RuntimeError("the second moto server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_endpoints_never_share_a_client_or_what_it_learnt(
    s3_endpoint: str, s3_bucket: str, second_s3_endpoint: str
) -> None:
    first = open_storage("s3://x", endpoint_url=s3_endpoint)
    assert open_storage("s3://y", endpoint_url=s3_endpoint) is first  # one backend per endpoint and region
    second = open_storage("s3://x", endpoint_url=second_s3_endpoint)
    assert second is not first and second.client is not first.client
    assert open_storage("s3://x", endpoint_url=s3_endpoint, region="eu-west-1") is not first

    # the first endpoint has this bucket, and its backend learns so; the second endpoint has none
    assert first.stat(f"s3://{s3_bucket}/missing") is None
    with pytest.raises(StorageError, match=f"bucket '{s3_bucket}' does not exist at {second_s3_endpoint}"):
        second.stat(f"s3://{s3_bucket}/missing")


def test_verify_streams_objects_instead_of_reading_them_whole(
    store: tuple[Storage, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracemalloc

    import pipelora.storage as storage_module

    s, root = store
    payload = os.urandom(4 * 1024 * 1024)
    info = s.write_bytes(join_uri(root, "big", "blob.bin"), payload)
    marker = join_uri(root, "big", "COMMITTED")
    s.commit(marker, [info])
    monkeypatch.setattr(storage_module, "CHUNK", 64 * 1024)
    del payload
    tracemalloc.start()
    try:
        s.verify_committed(marker)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # a quarter of the object: never held whole
    assert s.checksum(info.uri) == info


def test_verify_names_a_truncated_object_by_size(store: tuple[Storage, str]) -> None:
    s, root = store
    info = s.write_bytes(join_uri(root, "t", "x"), b"abcdef")
    s.commit(join_uri(root, "t", "COMMITTED"), [info])
    s.write_bytes(info.uri, b"abc")
    with pytest.raises(StorageError, match=f"{info.uri} is 3 bytes but .* recorded 6; it was modified"):
        s.verify_committed(join_uri(root, "t", "COMMITTED"))


def test_verify_of_a_missing_object_names_it(store: tuple[Storage, str]) -> None:
    s, root = store
    info = s.write_bytes(join_uri(root, "m", "x"), b"abc")
    s.commit(join_uri(root, "m", "COMMITTED"), [info])
    s.delete_prefix(info.uri)
    with pytest.raises(StorageError, match=f"{info.uri} does not exist"):
        s.verify_committed(join_uri(root, "m", "COMMITTED"))


def test_a_marker_that_is_not_an_object_is_refused(store: tuple[Storage, str]) -> None:
    s, root = store
    s.write_json(join_uri(root, "odd", "COMMITTED"), ["not", "a", "marker"])
    with pytest.raises(StorageError, match="is not a commit marker"):
        s.read_marker(join_uri(root, "odd", "COMMITTED"))


def test_batch_delete_refusals_are_raised_naming_the_keys(s3_endpoint: str, s3_bucket: str) -> None:
    """DeleteObjects answers 200 with per-key Errors; moto reports them for keys a bucket policy protects."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s = open_storage("s3://x", endpoint_url=s3_endpoint)
    root = f"s3://{s3_bucket}/run"
    for name in ["free/a", "free/b", "locked/c", "locked/d"]:
        s.write_bytes(join_uri(root, name), b"x")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject",
                       "Resource": f"arn:aws:s3:::{s3_bucket}/run/locked/*"}],
    }
    client.put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps(policy))
    try:
        with pytest.raises(StorageError) as info:
            s.delete_prefix(root)
    finally:
        client.delete_bucket_policy(Bucket=s3_bucket)
    message = str(info.value)
    assert message.startswith(f"cannot delete 2 of 4 objects under {root}: ")
    assert "run/locked/c (AccessDenied)" in message and "run/locked/d (AccessDenied)" in message
    assert "free" not in message and "\n" not in message
    assert [o.uri for o in s.list(root)] == [join_uri(root, "locked/c"), join_uri(root, "locked/d")]
    assert s.delete_prefix(root) == 2 and s.list(root) == []


def test_retry_policy_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelora.storage import RetryPolicy

    for name in ("PIPELORA_S3_MAX_ATTEMPTS", "PIPELORA_S3_CONNECT_TIMEOUT", "PIPELORA_S3_READ_TIMEOUT",
                 "PIPELORA_S3_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    assert RetryPolicy.from_env() == RetryPolicy(attempts=5, connect_timeout=10.0, read_timeout=60.0, mode="standard")
    monkeypatch.setenv("PIPELORA_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("PIPELORA_S3_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("PIPELORA_S3_READ_TIMEOUT", "7")
    monkeypatch.setenv("PIPELORA_S3_RETRY_MODE", "adaptive")
    assert RetryPolicy.from_env() == RetryPolicy(attempts=3, connect_timeout=2.5, read_timeout=7.0, mode="adaptive")


@pytest.mark.parametrize(("name", "value", "says"), [
    ("PIPELORA_S3_MAX_ATTEMPTS", "many", "PIPELORA_S3_MAX_ATTEMPTS must be a whole number of at least 1, not 'many'"),
    ("PIPELORA_S3_MAX_ATTEMPTS", "0", "PIPELORA_S3_MAX_ATTEMPTS must be a whole number of at least 1, not '0'"),
    ("PIPELORA_S3_READ_TIMEOUT", "nan", "PIPELORA_S3_READ_TIMEOUT must be a number of seconds of at least 0.1"),
    ("PIPELORA_S3_CONNECT_TIMEOUT", "-1", "PIPELORA_S3_CONNECT_TIMEOUT must be a number of seconds of at least 0.1"),
    ("PIPELORA_S3_RETRY_MODE", "eager", "PIPELORA_S3_RETRY_MODE must be one of standard, adaptive, legacy, not 'eager'"),
])
def test_a_bad_retry_setting_is_one_sentence(name: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelora.storage import S3Storage

    monkeypatch.setenv(name, value)
    with pytest.raises(StorageError) as info:
        S3Storage(endpoint_url="http://127.0.0.1:9")
    assert str(info.value).startswith(says) and "\n" not in str(info.value)


def test_the_client_carries_the_policy() -> None:
    """Every request of the client, and every download part of the transfer manager, gets the attempts
    and timeouts, so a stalled store never hangs a rank."""
    from pipelora.storage import RetryPolicy, S3Storage

    s = S3Storage(endpoint_url="http://127.0.0.1:9",
                  policy=RetryPolicy(attempts=3, connect_timeout=1.5, read_timeout=4.0, mode="standard"))
    config = s.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (1.5, 4.0)
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert s.transfer.num_download_attempts == 3


def test_an_unreachable_endpoint_is_tried_the_configured_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's own retry count, observed through its event hooks: one request per attempt."""
    from pipelora.storage import RetryPolicy, S3Storage

    s = S3Storage(endpoint_url=f"http://127.0.0.1:{free_port()}",
                  policy=RetryPolicy(attempts=3, connect_timeout=1.0, read_timeout=1.0))
    sent: list[str] = []
    s.client.meta.events.register("before-send.s3.*", lambda request, **_: sent.append(request.method))
    with pytest.raises(StorageError, match="is unreachable"):
        s.read_bytes("s3://bucket/key")
    assert sent == ["GET", "GET", "GET"]
