"""The fault proxy itself: what each fault kind looks like to a plain HTTP client, and a schedule
that is seeded, keeps its rate and never fails one request more than `max_streak` times in a row."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import boto3
import pytest
from s3faults import KINDS, FaultProxy, request_key


def _conn(proxy: FaultProxy, timeout: float = 10.0) -> http.client.HTTPConnection:
    url = urlsplit(proxy.url)
    return http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)


def _put(s3_endpoint: str, bucket: str, key: str, body: bytes) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").put_object(Bucket=bucket, Key=key, Body=body)


def _signed(proxy: FaultProxy, bucket: str, key: str, method: str = "get_object") -> str:
    """The path and query of a presigned request through the proxy (moto refuses anonymous reads)."""
    client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
    url = urlsplit(client.generate_presigned_url(method, Params={"Bucket": bucket, "Key": key}))
    return f"{url.path}?{url.query}"


def _outcomes(proxy: FaultProxy, bucket: str, keys: list[str], repeats: int = 1) -> list[str | None]:
    """Send HEAD requests (one per key, `repeats` rounds) and record which fault each got."""
    seen: list[str | None] = []
    for _ in range(repeats):
        for key in keys:
            before = len(proxy.injected)
            conn = _conn(proxy)
            try:
                conn.request("HEAD", f"/{bucket}/{key}")
                conn.getresponse().read()
            finally:
                conn.close()
            seen.append(proxy.injected[-1].kind if len(proxy.injected) > before else None)
    return seen


def test_errors_are_s3_xml_and_never_reach_the_server(make_proxy: Callable[..., FaultProxy], s3_endpoint: str,
                                                      s3_bucket: str) -> None:
    for kind, status, code in (("error-500", 500, "InternalError"), ("slowdown-503", 503, "SlowDown")):
        proxy = make_proxy(kinds=[kind], rate=1.0, max_streak=1)
        conn = _conn(proxy)
        conn.request("PUT", f"/{s3_bucket}/{kind}", body=b"payload")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == status
        assert f"<Code>{code}</Code>".encode() in body and b"<Error>" in body
        conn.request("PUT", f"/{s3_bucket}/{kind}", body=b"payload")  # the same connection, kept alive
        assert conn.getresponse().status == 200  # the second occurrence passes (max_streak 1)
        conn.close()
        assert proxy.counts == {kind: 1} and proxy.requests == 2
    listed = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(Bucket=s3_bucket)
    assert sorted(o["Key"] for o in listed["Contents"]) == ["error-500", "slowdown-503"]


def test_reset_request_reads_part_of_the_upload_then_resets(make_proxy: Callable[..., FaultProxy],
                                                            s3_endpoint: str, s3_bucket: str) -> None:
    seen: list[tuple[str, str, bytes]] = []
    proxy = make_proxy(kinds=["reset-request"], rate=1.0, max_streak=1,
                       observe=lambda method, path, body: seen.append((method, path, body)))
    conn = _conn(proxy)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        conn.request("PUT", f"/{s3_bucket}/upload", body=b"x" * 4_000_000)
        conn.getresponse().read()
    conn.close()
    assert proxy.counts == {"reset-request": 1} and seen == []  # nothing was forwarded
    conn = _conn(proxy)
    conn.request("PUT", f"/{s3_bucket}/upload", body=b"x" * 4_000_000)
    assert conn.getresponse().status == 200
    conn.close()
    assert seen == [("PUT", f"/{s3_bucket}/upload", b"x" * 4_000_000)]


def test_reset_response_cuts_a_ranged_download_mid_body(make_proxy: Callable[..., FaultProxy], s3_endpoint: str,
                                                        s3_bucket: str) -> None:
    payload = bytes(range(256)) * 400
    _put(s3_endpoint, s3_bucket, "blob", payload)
    proxy = make_proxy(kinds=["reset-response"], rate=1.0, max_streak=1)
    path = _signed(proxy, s3_bucket, "blob")
    conn = _conn(proxy)
    conn.request("GET", path, headers={"Range": "bytes=1000-50999"})
    resp = conn.getresponse()
    assert resp.status == 206 and resp.getheader("Content-Length") == "50000"
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        resp.read()
    conn.close()
    conn = _conn(proxy)
    conn.request("GET", path, headers={"Range": "bytes=1000-50999"})
    assert conn.getresponse().read() == payload[1000:51000]
    conn.close()
    # A HEAD or a PUT has no body to cut: response faults pass them untouched.
    conn = _conn(proxy)
    conn.request("HEAD", _signed(proxy, s3_bucket, "blob", "head_object"))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == str(len(payload))
    conn.close()
    assert proxy.counts == {"reset-response": 1}


def test_delay_and_stall_outlast_a_client_timeout(make_proxy: Callable[..., FaultProxy], s3_endpoint: str,
                                                  s3_bucket: str) -> None:
    _put(s3_endpoint, s3_bucket, "slow", b"y" * 100_000)
    proxy = make_proxy(kinds=["delay"], rate=1.0, max_streak=1, delay_s=2.0)
    path = _signed(proxy, s3_bucket, "slow")
    conn = _conn(proxy, timeout=0.5)
    with pytest.raises(socket.timeout):
        conn.request("GET", path)
        conn.getresponse()
    conn.close()
    assert proxy.counts == {"delay": 1}
    proxy = make_proxy(kinds=["stall-response"], rate=1.0, max_streak=1, delay_s=2.0)
    conn = _conn(proxy, timeout=0.5)
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(socket.timeout):
        resp.read()
    conn.close()
    assert proxy.counts == {"stall-response": 1}
    conn = _conn(proxy)
    conn.request("GET", path)  # the next occurrence: max_streak 1 lets it through
    assert conn.getresponse().read() == b"y" * 100_000
    conn.close()


def test_schedule_is_seeded_keeps_its_rate_and_bounds_streaks(make_proxy: Callable[..., FaultProxy],
                                                              s3_bucket: str) -> None:
    keys = [f"k{i}" for i in range(300)]
    first = make_proxy(kinds=["error-500", "slowdown-503"], rate=0.15, seed=11)
    again = make_proxy(kinds=["error-500", "slowdown-503"], rate=0.15, seed=11)
    other = make_proxy(kinds=["error-500", "slowdown-503"], rate=0.15, seed=12)
    a, b, c = (_outcomes(p, s3_bucket, keys) for p in (first, again, other))
    assert a == b and a != c
    share = sum(x is not None for x in a) / len(a)
    assert 0.10 <= share <= 0.20, share
    assert {x for x in a if x} == {"error-500", "slowdown-503"}
    assert first.counts["error-500"] + first.counts["slowdown-503"] == sum(x is not None for x in a)

    streaky = make_proxy(kinds=["error-500"], rate=1.0, max_streak=2)
    assert _outcomes(streaky, s3_bucket, ["same"], repeats=6) == ["error-500", "error-500", None] * 2


def test_outage_answers_everything_until_it_ends(make_proxy: Callable[..., FaultProxy], s3_bucket: str) -> None:
    proxy = make_proxy(outage="slowdown-503")
    assert _outcomes(proxy, s3_bucket, ["a", "b"], repeats=3) == ["slowdown-503"] * 6
    proxy.configure(outage=None)
    assert _outcomes(proxy, s3_bucket, ["a", "b"]) == [None, None]


def test_request_keys_ignore_the_upload_id_but_not_the_part_or_range() -> None:
    one = request_key("PUT", "/b/k?partNumber=2&uploadId=abc", None)
    assert one == request_key("PUT", "/b/k?uploadId=xyz&partNumber=2", None)
    assert one != request_key("PUT", "/b/k?partNumber=3&uploadId=abc", None)
    assert request_key("GET", "/b/k", "bytes=0-9") != request_key("GET", "/b/k", "bytes=10-19")


def test_unknown_kinds_are_refused(s3_endpoint: str) -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultProxy(s3_endpoint, kinds=["teapot-418"]).close()
    assert len(KINDS) == 6
