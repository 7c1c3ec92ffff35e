"""Serving an HTTP (ASGI) app the way every Shoal HTTP process does: the gateway and the sandbox."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling.

    uvicorn's handlers re-raise the signal after shutdown, so a clean SIGTERM would end with
    status -15 instead of 0; the process installs loop handlers instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, before the port is announced: early connections wait in the backlog
    instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock
