"""Cache hits in process: the same page (3 experiences, 9 value reads) built every way
``_apps`` knows, driven by direct ASGI calls, each as a ratio to the plain page.

Rows: the hand-written floor; the middleware on while the page reads nothing; the page
reading the handle; the tag and its value reads without hooks; the full page (tag, 6
hooks, script); GrowthBook with one shared client (the peer) and per request; then the
full page against the floor and against the peer, and the middleware alone in front of a
trivial ASGI app. Every timed request to a middleware page is checked to be a cache hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from personalize_middleware import PersonalizeMiddleware
from personalize_middleware.cache._store import DEFAULT_CACHE_TTL

from ._apps import (
    BROWSER_HEADERS,
    FULL_PAGE,
    KEYS,
    PRESETS,
    SECRET,
    InstantBackend,
    preset_app,
    visitor_cookie,
)
from ._asgi import (
    Response,
    Timing,
    find_middleware,
    lifespan,
    make_scope,
    request,
    same_hour,
    timed,
)
from ._report import Row, fmt_us, paired

__all__ = ["FULL_TARGET", "IGNORED_TARGET", "ROWS", "hit_scope", "run", "warm_hit"]

FULL_TARGET = 1.25
IGNORED_TARGET = 1.10
PEER = "growthbook_shared"
#: (preset, label, target ratio to the plain page)
ROWS: tuple[tuple[str, str, float | None], ...] = (
    ("floor", "hand-written floor: dict lookup per user + one HMAC per page view", None),
    ("ignored", "middleware on, page reads nothing", IGNORED_TARGET),
    ("direct", "middleware, page reads the handle (9 reads), no tag", None),
    ("tag", "tag + 9 value reads, no hooks", None),
    ("full", "full page: tag + 9 value reads + 6 hooks + script", FULL_TARGET),
    (PEER, "GrowthBook, ONE shared GrowthBookClient (peer)", None),
    ("growthbook", "GrowthBook, a GrowthBook instance per request", None),
)
_MIDDLEWARE_PRESETS = ("ignored", "direct", "tag", "full")
_NOTES = {
    "floor": (
        "{how}. The floor's handler reads the visitor cookie, looks the user's values up in "
        "a dict, makes a page-view id and signs it (one HMAC-SHA256), and renders the same "
        "values and the token into the plain template"
    ),
    "ignored": "the middleware resolves the visitor and looks the 3 experiences up (hits)",
    "full": "{page}: 3 impression hooks, 3 click hooks, personalize_script()",
    PEER: (
        "one GrowthBookClient (features set at start-up), per request a UserContext and 3 "
        "JSON features (targeting rule + 50/50 experiment), exposures to a callback"
    ),
    "growthbook": "per request GrowthBook(attributes, features, callback), 3 features, destroy()",
}


def hit_scope() -> dict[str, Any]:
    """The returning visitor's request (signed visitor cookie, a browser's headers)."""
    return make_scope("/", headers=(*BROWSER_HEADERS, (b"cookie", visitor_cookie().encode())))


async def warm_hit(app: ASGIApp, scope: dict[str, Any]) -> Response:
    """Request until the app answers from its cache (the first request is the miss that
    fills L1; a page that never waits may answer before the fill lands)."""
    stats = find_middleware(app).store.stats
    for _ in range(100):
        before = stats.hits
        response = await request(app, scope)
        if stats.hits > before:
            return response
        await asyncio.sleep(0)  # let the fetch task finish
    raise AssertionError("the page never became a cache hit")


def _titles(body: bytes) -> list[bytes]:
    return re.findall(rb"<h2>(.*?)</h2>", body)


async def run(*, quick: bool) -> list[Row]:
    # Short batches, many rounds: a round's batches run close together in time, so a
    # neighbour's burst hits both sides of a ratio (IQR about half of 21 x 500's here).
    iterations, rounds = (50, 21) if quick else (100, 105)
    names = ("plain", *(name for name, _, _ in ROWS))
    apps: dict[str, Starlette] = {name: preset_app(name) for name in names}
    scope = hit_scope()
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(lifespan(app))
        timings = await same_hour(lambda: _measure(apps, scope, iterations, rounds))
    base = timings["plain"]
    how = (
        f"CPU time per request, {rounds} interleaved rounds x {iterations} direct ASGI calls; "
        "ratio = median of the per-round ratios"
    )
    rows = [_page_row(name, label, goal, base, timings[name], how) for name, label, goal in ROWS]
    rows.append(_versus("floor", "hand-written floor", timings, how))
    peer = _versus(PEER, "GrowthBook shared client (peer)", timings, how)
    peer.target, peer.met = "< 1.00x", peer.ratio is not None and peer.ratio < 1.0
    rows.append(peer)
    rows.append(await _middleware_alone(scope, iterations * 4, rounds))
    return rows


async def _measure(
    apps: dict[str, Starlette], scope: dict[str, Any], iterations: int, rounds: int
) -> dict[str, Timing]:
    """Warm every page, time them all, check every timed request hit."""
    stores = []
    for name in _MIDDLEWARE_PRESETS:
        _check_hit(name, await warm_hit(apps[name], scope))
        stores.append(find_middleware(apps[name]).store.stats)
    bodies = {}
    for name in ("plain", "floor", PEER, "growthbook"):
        response = await request(apps[name], scope)
        assert response.status == 200, name
        bodies[name] = response.body
    full_titles = _titles((await request(apps["full"], scope)).body)
    assert _titles(bodies["floor"]) == full_titles, "the floor renders other values"
    before = [(s.upstream_calls, s.hits + s.stale_hits) for s in stores]
    started = time.monotonic()
    timings = await timed(apps, scope, iterations=iterations, rounds=rounds)
    # Every timed request must have been a cache hit, else the figure is not what it
    # says; a long run may see the entry go stale (served, one background refresh).
    refreshes = (time.monotonic() - started) // DEFAULT_CACHE_TTL + 1
    for stats, (calls, hits) in zip(stores, before, strict=True):
        assert stats.upstream_calls - calls <= refreshes, "a timed request went upstream"
        served = stats.hits + stats.stale_hits - hits
        # + 1: the untimed warm-up call `timed` makes
        assert served == len(KEYS) * (iterations * rounds + 1), "not every request hit"
    for name in (PEER, "growthbook"):
        assert apps[name].state.exposures.count > 0, f"{name}: no experiment evaluated"
    return timings


def _page_row(
    name: str, label: str, target: float | None, base: Timing, measured: Timing, how: str
) -> Row:
    spread = paired(measured.rounds, base.rounds)
    added = measured.median - base.median
    row = Row(
        section="hit",
        name=label,
        baseline=f"{fmt_us(base.median)} (plain page)",
        measured=f"{fmt_us(measured.median)} (+{fmt_us(added)})",
        ratio=spread.median,
        spread=spread,
        note=_NOTES.get(name, "").format(how=how, page=FULL_PAGE.describe()),
        data={"baseline_us": base.rounds, "measured_us": measured.rounds, "preset": name},
    )
    if target is not None:
        row.target = f"<= {target:.2f}x"
        row.met = spread.median <= target
    return row


def _versus(name: str, label: str, timings: dict[str, Timing], how: str) -> Row:
    full, other = timings["full"], timings[name]
    spread = paired(full.rounds, other.rounds)
    return Row(
        section="hit",
        name=f"full page vs {label}",
        baseline=f"{fmt_us(other.median)} ({label})",
        measured=f"{fmt_us(full.median)} (full page)",
        ratio=spread.median,
        spread=spread,
    )


async def _trivial_page(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app doing next to nothing but read the 3 experiences when it has them."""
    handle = scope.get("state", {}).get("personalize")
    titles = b""
    if handle is not None:
        await handle.wait()
        titles = "".join(str(handle.value(k, "title", "")) for k in KEYS).encode()
    await send({"type": "http.response.start", "status": 200, "headers": _TRIVIAL_HEADERS})
    await send({"type": "http.response.body", "body": titles or b"defaults"})


_TRIVIAL_HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


async def _middleware_alone(scope: dict[str, Any], iterations: int, rounds: int) -> Row:
    """The middleware's own cost: in front of a trivial app rather than a template page."""
    middleware = PersonalizeMiddleware(
        _trivial_page,
        backend=InstantBackend(),
        routes={"/": list(KEYS)},
        secret_key=SECRET,
        metadata_refresh=None,
    )
    await middleware.startup()  # what the lifespan would do (the trivial app has none)
    try:
        await request(middleware, scope)
        assert b"home-hero for" in (await request(middleware, scope)).body
        timings = await timed(
            {"app": _trivial_page, "wrapped": middleware},
            scope,
            iterations=iterations,
            rounds=rounds,
        )
    finally:
        await middleware.shutdown()
    base, measured = timings["app"], timings["wrapped"]
    spread = paired(measured.rounds, base.rounds)
    return Row(
        section="hit",
        name="middleware alone (trivial ASGI app reading 3 experiences)",
        baseline=f"{fmt_us(base.median)} (trivial app)",
        measured=f"{fmt_us(measured.median)} (+{fmt_us(measured.median - base.median)})",
        ratio=spread.median,
        spread=spread,
        note=(
            f"{rounds} rounds x {iterations} calls; the middleware's own work: identity from "
            "the signed cookie, attributes, L1 lookup, handle, cache headers"
        ),
        data={"added_us": measured.median - base.median},
    )


def _check_hit(name: str, response: Response) -> None:
    body = response.body
    if name != "ignored":
        assert b"home-hero for" in body, f"{name}: the cache hit was not personalized"
    assert not response.header(b"set-cookie"), "the visitor cookie was not accepted"
    if name == "full":
        assert b"data-pz-impression" in body and b"data-pz-click" in body, "hooks missing"
    assert name in PRESETS
