"""Events: beacons through the tracking endpoint, and upstream calls for 100 users.

Each beacon is one page view's events as the tracking script sends them: 3 impression
tokens and 1 click token, signed for the visitor sending it (its signed cookie), each
beacon from its own page view (a new render id, so none is a replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import secrets
import statistics
import time
from typing import Any

from starlette.types import ASGIApp, Message

from personalize_middleware import Identity
from personalize_middleware._identity import VisitorCookie
from personalize_middleware.tracking import TrackingLimits, TrackingToken, encode_token

from ._apps import BROWSER_HEADERS, KEYS, InstantBackend, build_app, experience_body
from ._asgi import find_middleware, lifespan, make_scope
from ._report import Row, paired
from ._standin import StandIn
from .upstream import _settings

__all__ = ["run"]

EVENTS_PER_BEACON = 4


def _contexts() -> dict[str, dict[str, Any]]:
    answer = json.loads(experience_body(KEYS, "anyone"))["experiences"]
    return {key: item["experience_context"] for key, item in answer.items()}


def _beacons(app: ASGIApp, users: int, count: int) -> list[tuple[dict[str, Any], bytes]]:
    """``count`` (scope, body) pairs spread over ``users`` visitors."""
    middleware = find_middleware(app)
    keyring = middleware.keyring
    cookies = VisitorCookie(keyring)
    visitors = [secrets.token_urlsafe(16) for _ in range(users)]
    headers = [
        (
            *BROWSER_HEADERS,
            (b"origin", b"http://shop.example"),
            (b"sec-fetch-site", b"same-origin"),
            (b"content-type", b"text/plain;charset=UTF-8"),
            (b"cookie", cookies.set_cookie_header(v, secure=False).split(b";", 1)[0]),
        )
        for v in visitors
    ]
    contexts = _contexts()
    expires = time.time() + 3600 - 2.0  # rendered 2 s ago: past the dwell a person needs
    out = []
    for i in range(count):
        identity = Identity(visitor_id=visitors[i % users])
        render_id = secrets.token_urlsafe(12)
        tokens = [
            encode_token(
                keyring,
                identity,
                TrackingToken(
                    kind="shown", key=k, context=contexts[k], render_id=render_id, expires=expires
                ),
            )
            for k in KEYS
        ]
        tokens.append(
            encode_token(
                keyring,
                identity,
                TrackingToken(
                    kind="clicked",
                    key=KEYS[0],
                    context=contexts[KEYS[0]],
                    render_id=render_id,
                    expires=expires,
                    b_id="cta",
                ),
            )
        )
        body = json.dumps({"events": tokens}).encode()
        path = middleware.tracking.events_path if middleware.tracking else "/beacon"
        scope = make_scope(path, method="POST", headers=headers[i % users])
        out.append((scope, body))
    return out


async def _post(app: ASGIApp, scope: dict[str, Any], body: bytes) -> int:
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(dict(scope), receive, send)
    return status


async def _rate(app: ASGIApp, beacons: list[tuple[dict[str, Any], bytes]], path: str) -> float:
    gc.collect()
    started = time.perf_counter()
    for i, (scope, body) in enumerate(beacons):
        scope = {**scope, "path": path, "raw_path": path.encode()}
        status = await _post(app, scope, body)
        assert status == 204, status
        if i % 100 == 99:
            await asyncio.sleep(0)  # let the batcher send, as between requests in a server
    return len(beacons) / (time.perf_counter() - started)


async def _throughput(quick: bool) -> Row:
    count, rounds = (300, 3) if quick else (1000, 7)
    app = build_app("tag", backend=InstantBackend())
    async with lifespan(app):
        middleware = find_middleware(app)
        assert middleware.tracking is not None
        # Thousands of beacons from one visitor and address: not what the caps are for.
        middleware.tracking.limits = TrackingLimits(
            visitor_events_per_minute=None, ip_events_per_minute=None
        )
        events_path = middleware.tracking.events_path
        stats = middleware.tracking.stats
        plain: list[float] = []
        endpoint: list[float] = []
        for r in range(rounds):
            batch = _beacons(app, 100, count)  # fresh page views: no replays
            if r % 2:  # the order alternates, so neither always runs first
                plain.append(await _rate(app, batch, "/beacon"))
            before = stats.accepted
            endpoint.append(await _rate(app, batch, events_path))
            assert stats.accepted - before == EVENTS_PER_BEACON * count, "a beacon was refused"
            if not r % 2:
                plain.append(await _rate(app, batch, "/beacon"))
        assert middleware.tracking.batcher.stats.dropped == 0, "events were dropped"
    base, measured = statistics.median(plain), statistics.median(endpoint)
    spread = paired(endpoint, plain)
    return Row(
        section="events",
        name=f"accepted beacons/s ({EVENTS_PER_BEACON} events each)",
        baseline=f"{base:,.0f}/s (plain endpoint, same body)",
        measured=f"{measured:,.0f}/s ({measured * EVENTS_PER_BEACON:,.0f} events/s)",
        ratio=spread.median,
        spread=spread,
        note=(
            f"direct ASGI calls through the middleware, median of {rounds} rounds x {count} "
            "beacons from 100 visitors; every token verified, deduplicated and queued; the "
            "baseline endpoint reads and parses the same JSON and answers 204"
        ),
    )


async def _upstream_calls() -> Row:
    users = 100
    with StandIn() as standin:
        standin.reset(delay=0.0)
        app = build_app("tag", settings=_settings(standin))
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(lifespan(app))
            for scope, body in _beacons(app, users, users):
                assert await _post(app, scope, body) == 204
        # Lifespan shutdown flushed the batcher.
        counters = standin.counters()
    actions = users * EVENTS_PER_BEACON
    calls = counters["event_calls"]
    assert counters["event_actions"] == actions, counters
    return Row(
        section="events",
        name=f"upstream calls for {users} users' actions ({actions} actions)",
        baseline=f"{actions} calls (one per action)",
        measured=f"{calls} call(s), {counters['event_elements']} elements",
        ratio=calls / actions,
        note="the real client against the stand-in over HTTP; counted at the stand-in",
    )


async def run(*, quick: bool) -> list[Row]:
    return [await _throughput(quick), await _upstream_calls()]
