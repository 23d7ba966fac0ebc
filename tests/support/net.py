"""Local ports for the tests' servers, rendezvous and unreachable endpoints."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago; nothing listens on it until a test binds it,
    so it also serves as an endpoint that refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
