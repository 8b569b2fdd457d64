"""Drive an ASGI app directly: lifespan, requests with a minimal receive/send, timing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message

from personalize_middleware import PersonalizeMiddleware

__all__ = [
    "Response",
    "Timing",
    "find_middleware",
    "lifespan",
    "make_scope",
    "request",
    "same_hour",
    "timed",
]

T = TypeVar("T")

_REQUEST_MESSAGE: Message = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> Message:
    return _REQUEST_MESSAGE


async def _discard(message: Message) -> None:
    return None


def make_scope(
    path: str = "/",
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    method: str = "GET",
    client: tuple[str, int] = ("203.0.113.7", 51234),
    query_string: bytes = b"",
) -> dict[str, Any]:
    """An HTTP scope as uvicorn builds it (copy it per request: the app adds ``state``)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query_string,
        "headers": list(headers),
        "client": client,
        "server": ("127.0.0.1", 8000),
    }


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


async def request(app: ASGIApp, scope: dict[str, Any]) -> Response:
    """One request, collecting the response (for checks; ``timed`` discards it)."""
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    await app(dict(scope), _receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Response(start["status"], list(start.get("headers", [])), body)


@contextlib.asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's lifespan start-up and shut-down around the block, as a server does."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    task = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    reply = asyncio.ensure_future(outbox.get())
    await asyncio.wait({reply, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not reply.done():
        reply.cancel()
        if task.done():
            task.result()  # raises what the app raised
        raise RuntimeError("lifespan start-up did not finish")
    started = reply.result()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan start-up failed: {started}")
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(outbox.get(), 10)
        await asyncio.wait_for(task, 10)


def find_middleware(app: Any) -> PersonalizeMiddleware:
    """The ``PersonalizeMiddleware`` instance inside a started Starlette app."""
    node = getattr(app, "middleware_stack", None) or app
    for _ in range(20):
        if isinstance(node, PersonalizeMiddleware):
            return node
        node = getattr(node, "app", None)
        if node is None:
            break
    raise LookupError("no PersonalizeMiddleware in this app")


@dataclass
class Timing:
    """Per-request microseconds, one figure per round (the mean of that round)."""

    rounds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def best(self) -> float:
        return min(self.rounds)


async def timed(
    apps: Mapping[str, ASGIApp],
    scope: dict[str, Any],
    *,
    iterations: int,
    rounds: int,
) -> dict[str, Timing]:
    """Time every app on the same request, rounds interleaved so drift hits them alike
    (the order rotates from round to round).

    The clock is this thread's CPU time: time spent descheduled while other processes
    use the CPU does not count, so a busy machine skews the figures less."""
    results: dict[str, list[float]] = {name: [] for name in apps}
    clock = time.thread_time
    names = list(apps)
    for app in apps.values():  # untimed: template compilation, first-call caches
        await app(scope.copy(), _receive, _discard)
    for r in range(rounds):
        # Each round starts with the next app, so no app always runs first (or last).
        for name in names[r % len(names) :] + names[: r % len(names)]:
            app = apps[name]
            gc.collect()
            started = clock()
            for i in range(iterations):
                await app(scope.copy(), _receive, _discard)
                if i % 100 == 99:
                    # Let background tasks (refreshes, the event batcher) run, as between
                    # requests in a server; a loop that never yields would starve them.
                    await asyncio.sleep(0)
            results[name].append((clock() - started) / iterations * 1e6)
    return {name: Timing(values) for name, values in results.items()}


def _utc_hour() -> int:
    return int(time.time() // 3600)


async def same_hour(measure: Callable[[], Awaitable[T]], attempts: int = 3) -> T:
    """Run ``measure`` (warm-up, timing and its cache-hit checks) again when it failed
    across a UTC hour: the hour is part of every cache key (``TIME_OF_THE_DAY``), so on
    the hour every cached user misses once, and a check that every request hit fails."""
    for attempt in range(attempts):
        hour = _utc_hour()
        try:
            return await measure()
        except AssertionError:
            if _utc_hour() == hour or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
