"""Serve an ASGI app with uvicorn on 127.0.0.1, on a free port, in a background thread.

::

    with run_asgi_server(app) as base_url:      # "http://127.0.0.1:<port>"
        ...                                     # works in sync and in async tests

The port is bound before uvicorn starts (so there is no "find a free port, hope it stays
free" race), the context manager returns only once uvicorn is accepting connections, and
on exit the server shuts down gracefully (lifespan shutdown included). Requests still
hanging after ``shutdown_timeout`` seconds are cancelled so a test can never hang here.

The app runs on the server thread's own event loop: asyncio primitives it uses must be
created and awaited there (inside the app), not shared with the test's loop; use
``threading`` primitives to talk across.

``refused_url()`` gives a URL where connections are refused, for "connection refused".
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any, Literal

import uvicorn

__all__ = ["refused_url", "run_asgi_server"]


class _Server(uvicorn.Server):
    """Signals readiness through a ``threading.Event`` instead of being polled."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self._ready.set()  # also on failure: the waiter then sees `started` is False


@contextlib.contextmanager
def run_asgi_server(
    app: Any,
    *,
    lifespan: Literal["auto", "on", "off"] = "auto",
    startup_timeout: float = 10.0,
    shutdown_timeout: float = 5.0,
) -> Iterator[str]:
    """Run ``app`` on ``http://127.0.0.1:<free port>`` for the ``with`` block; yields that
    base URL (no trailing slash)."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is TCP,
    # and accepted sockets inherit proto 0 otherwise (Nagle + delayed ACK: ~40 ms a
    # request on a kept-alive connection).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan=lifespan,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=max(1, int(shutdown_timeout)),
    )
    ready = threading.Event()
    server = _Server(config, ready)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # surfaced to the test below, not lost in a thread
            errors.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=serve, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        if not ready.wait(startup_timeout) or not server.started:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on port {port}: {errors or 'timeout'}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(shutdown_timeout)
        sock.close()
    if thread.is_alive():
        raise RuntimeError(f"uvicorn on port {port} did not stop")
    if errors:
        raise RuntimeError(f"uvicorn on port {port} failed") from errors[0]


@contextlib.contextmanager
def refused_url() -> Iterator[str]:
    """A base URL on 127.0.0.1 whose port is bound but not listening: connecting is
    refused at once (and the port cannot be reused by someone else meanwhile)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
