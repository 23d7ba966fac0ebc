"""An HTTP proxy between S3 clients and an S3 server (moto in the tests) that injects the faults
object stores really produce, on a seeded schedule.

Fault kinds (`KINDS`):

- `error-500`: the request is answered `500 InternalError` (an S3 XML error body), never forwarded.
- `slowdown-503`: the request is answered `503 SlowDown`, never forwarded.
- `reset-request`: part of the request is read (half of its body, or only its headers when it
  has none), then the connection is reset; nothing reaches the server.
- `reset-response`: a GET is forwarded, the status, the headers (with the full Content-Length)
  and half of the body are sent, then the connection is reset (a ranged or whole download cut
  mid-body).
- `delay`: nothing is answered for `delay_s` (longer than the client's read timeout), then the
  connection is closed; nothing reaches the server.
- `stall-response`: like `reset-response`, but the body stops for `delay_s` before the reset.

Which requests fail is decided per request key (method, path without the multipart upload id,
Range header) and per occurrence of that key, from a hash of (seed, key, occurrence): the
schedule does not depend on how threads interleave, and a retry of a failed request is the next
occurrence. `max_streak` bounds how many occurrences of one key fail in a row, so a client that
retries more often than that always gets through: transient faults, as opposed to `outage`,
which answers every request with one fault kind (a persistent outage).

Counters (`counts`, `injected`, `requests`) record what was injected, so tests can check that a
run really went through faults. An `observe(method, path, body)` callback sees every request the
server is about to receive (the path without its query, the body without chunked framing), so a
test can check the server's state at the moment something is written.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

KINDS = ("error-500", "slowdown-503", "reset-request", "reset-response", "delay", "stall-response")
RESPONSE_KINDS = frozenset({"reset-response", "stall-response"})  # GETs only: they need a body to cut
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"})

_ERRORS = {
    "error-500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "slowdown-503": (503, "SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class Injection:
    kind: str
    method: str
    key: str


class _Aborted(Exception):
    """The handler reset or dropped the connection on purpose."""


def request_key(method: str, path: str, range_header: str | None) -> str:
    """What identifies 'the same request' across retries: the upload id of a multipart upload
    differs from one attempt of a whole upload to the next, so it is left out."""
    parts = urlsplit(path)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "uploadId"]
    key = f"{method} {parts.path}"
    if query:
        key += "?" + urlencode(sorted(query))
    if range_header:
        key += f" [{range_header}]"
    return key


def dechunk(raw: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    out, pos = bytearray(), 0
    while True:
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        out += raw[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


def _fraction(*parts: object) -> float:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FaultProxy:
    """A threaded proxy on 127.0.0.1 in front of `upstream` (an http:// URL).

    `rate` is the share of requests that fail; `kinds` the fault kinds drawn from. Settings can
    be changed while it runs (`configure`); a test points the project at `url`.
    """

    def __init__(self, upstream: str, *, kinds: Iterable[str] = KINDS, rate: float = 0.0, seed: int = 0,
                 delay_s: float = 3.0, max_streak: int = 2, outage: str | None = None,
                 observe: Callable[[str, str, bytes], None] | None = None) -> None:
        target = urlsplit(upstream)
        if target.scheme != "http" or not target.hostname or not target.port:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (target.hostname, target.port)
        self.seed = seed
        self.delay_s = delay_s
        self.max_streak = max_streak
        self.observe = observe
        self.observer_errors: list[str] = []
        self.kinds: tuple[str, ...] = ()
        self.rate = 0.0
        self.outage: str | None = None
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()  # occurrences per request key
        self._streak: Counter[str] = Counter()  # consecutive failed occurrences per request key
        self.counts: Counter[str] = Counter()
        self.injected: list[Injection] = []
        self.requests = 0
        self.log: list[str] = []  # every request key since the last `reset_counts`
        self._closing = threading.Event()
        self.configure(kinds=kinds, rate=rate, outage=outage)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    # -- settings and counters ------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def configure(self, *, kinds: Iterable[str] | None = None, rate: float | None = None,
                  outage: str | None = None) -> None:
        """Change what is injected from the next request on (`outage=None` ends an outage)."""
        with self._lock:
            if kinds is not None:
                chosen = tuple(kinds)
                unknown = sorted(set(chosen) - set(KINDS))
                if unknown:
                    raise ValueError(f"unknown fault kinds {unknown}; known: {KINDS}")
                self.kinds = chosen
            if rate is not None:
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"rate must be in [0, 1], not {rate}")
                self.rate = rate
            if outage is not None and outage not in KINDS:
                raise ValueError(f"unknown outage kind {outage!r}; known: {KINDS}")
            self.outage = outage

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.injected.clear()
            self.log.clear()
            self.requests = 0

    def attempts(self, method: str, path_prefix: str) -> int:
        """How many requests with this method reached the proxy, since the last `reset_counts`, for
        paths starting with `path_prefix`."""
        with self._lock:
            return sum(1 for key in self.log if key.startswith(f"{method} {path_prefix}"))

    def close(self) -> None:
        """Stop listening (a test of a server that is gone closes it early); closing twice is harmless."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the schedule -------------------------------------------------------------------------------
    def _decide(self, method: str, key: str) -> str | None:
        """The fault for this occurrence of `key`, or None to forward it untouched."""
        with self._lock:
            self.requests += 1
            self.log.append(key)
            occurrence = self._seen[key]
            self._seen[key] += 1
            if self.outage is not None:
                return self.outage
            applicable = [k for k in self.kinds if method == "GET" or k not in RESPONSE_KINDS]
            if not applicable or self._streak[key] >= self.max_streak:
                self._streak[key] = 0
                return None
            if _fraction(self.seed, key, occurrence, "fail") >= self.rate:
                self._streak[key] = 0
                return None
            self._streak[key] += 1
            return applicable[int(_fraction(self.seed, key, occurrence, "kind") * len(applicable))]

    def _record(self, kind: str, method: str, key: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            self.injected.append(Injection(kind, method, key))

    def _sleep(self) -> None:
        self._closing.wait(self.delay_s)

    # -- the HTTP side ------------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    timeout = 120  # an idle kept-alive connection is dropped after this
    owner: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except _Aborted:
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away first

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    # -- one request ----------------------------------------------------------------------------------
    def _proxy(self) -> None:
        owner = self.owner
        key = request_key(self.command, self.path, self.headers.get("Range"))
        kind = owner._decide(self.command, key)
        if kind == "reset-request":
            owner._record(kind, self.command, key)
            self._read_body(limit_half=True)
            self._reset()
        if kind == "delay":
            owner._record(kind, self.command, key)
            owner._sleep()
            self._reset()
        body = self._read_body(limit_half=False)
        if kind in _ERRORS:
            owner._record(kind, self.command, key)
            self._send_error_xml(kind)
            return
        if owner.observe is not None:
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            try:
                owner.observe(self.command, unquote(urlsplit(self.path).path), dechunk(body) if chunked else body)
            except Exception as exc:  # noqa: BLE001 - kept for the test to see, never a dropped request
                owner.observer_errors.append(f"{type(exc).__name__}: {exc}")
        status, reason, headers, payload = self._forward(body)
        cut = kind in RESPONSE_KINDS and self.command == "GET" and len(payload) >= 2
        if cut and kind is not None:
            owner._record(kind, self.command, key)
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if not cut:
            self.wfile.write(payload)
            return
        self.wfile.write(payload[: len(payload) // 2])
        self.wfile.flush()
        if kind == "stall-response":
            owner._sleep()
        self._reset()

    def _read_body(self, *, limit_half: bool) -> bytes:
        """The raw request body (chunked framing kept, so it is forwarded as sent)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = bytearray()
            while True:
                line = self.rfile.readline(65537)
                raw += line
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if limit_half and raw and size > 1:
                    raw += self.rfile.read(size // 2)
                    return bytes(raw)
                if size == 0:
                    while True:  # trailers, then the blank line
                        trailer = self.rfile.readline(65537)
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)  # the chunk and its CRLF
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length // 2 if limit_half else length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=300)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            payload = resp.read()
            headers = [(n, v) for n, v in resp.getheaders()
                       if n.lower() not in HOP_BY_HOP and n.lower() not in ("content-length", "transfer-encoding")]
            if self.command == "HEAD":
                length = resp.getheader("Content-Length")
                if length is not None:
                    headers.append(("Content-Length", length))
            return resp.status, resp.reason, headers, payload
        finally:
            conn.close()

    def _send_error_xml(self, kind: str) -> None:
        status, code, message = _ERRORS[kind]
        body = b"" if self.command == "HEAD" else (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{urlsplit(self.path).path}</Resource><RequestId>fault-{time.monotonic_ns()}</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a dropped connection looks to the client."""
        try:
            self.wfile.flush()
        except OSError:
            pass
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the socket's file objects hold it open: close them first
            self.connection.close()
        except OSError:
            pass
        raise _Aborted
