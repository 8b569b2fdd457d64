"""Cost growth: how the cache hit's cost grows with the page. A grid of pages, experiences
in {3, 10, 25} x tracking hooks in {0, 6, 30} (``_pages.Page``: 3 value reads per
experience, an impression per block first, then clicks; the script when there are
hooks), each with the middleware and the tag, as a ratio to the plain page of the same
size (the same blocks and links, no middleware, its defaults), all in the same
interleaved rounds. Target: 25 experiences x 30 hooks <= 1.6x its plain page.
"""

from __future__ import annotations

import contextlib
import time

from starlette.types import ASGIApp

from personalize_middleware.cache._store import DEFAULT_CACHE_TTL

from ._apps import Page, build_app
from ._asgi import Timing, find_middleware, lifespan, same_hour, timed
from ._report import Row, fmt_us, paired
from .inprocess import hit_scope, warm_hit

__all__ = ["EXPERIENCES", "GROWTH_TARGET", "HOOKS", "run"]

EXPERIENCES = (3, 10, 25)
HOOKS = (0, 6, 30)
GROWTH_TARGET = 1.6
TARGET_PAGE = Page(25, 30)


async def run(*, quick: bool) -> list[Row]:
    # Short batches, many rounds: a round's two batches run close together in time.
    iterations, rounds = (20, 10) if quick else (50, 45)
    pages = [Page(n, h) for n in EXPERIENCES for h in HOOKS]
    plain_of = {page: page.plain_name for page in pages}
    apps: dict[str, ASGIApp] = {}
    for page in pages:
        apps[page.tag_name] = build_app("tag", page=page)
        if page.plain_name not in apps:
            apps[page.plain_name] = build_app("plain", page=page)
    scope = hit_scope()
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(lifespan(app))

        async def measure() -> dict[str, Timing]:
            stores = {}
            for page in pages:
                body = (await warm_hit(apps[page.tag_name], scope)).body
                assert body.count(b"data-pz-impression") == min(page.hooks, page.experiences)
                assert body.count(b"data-pz-click") == max(0, page.hooks - page.experiences)
                assert body.count(b"for benchVisitor") == page.experiences, "not personalized"
                stores[page] = find_middleware(apps[page.tag_name]).store.stats
            before = {page: (s.hits + s.stale_hits, s.upstream_calls) for page, s in stores.items()}
            started = time.monotonic()
            timings = await timed(apps, scope, iterations=iterations, rounds=rounds)
            refreshes = int((time.monotonic() - started) // DEFAULT_CACHE_TTL + 1)
            for page, stats in stores.items():
                hits, calls = before[page]
                served = stats.hits + stats.stale_hits - hits
                assert served == page.experiences * (iterations * rounds + 1), "a request missed"
                assert stats.upstream_calls - calls <= refreshes, "a timed request went upstream"
            return timings

        timings = await same_hour(measure)
    rows = []
    for page in pages:
        base, measured = timings[plain_of[page]], timings[page.tag_name]
        spread = paired(measured.rounds, base.rounds)
        row = Row(
            section="growth",
            name=f"{page.experiences} experiences x {page.hooks} hooks",
            baseline=f"{fmt_us(base.median)} (plain, {page.experiences}x{page.links} links)",
            measured=f"{fmt_us(measured.median)} (+{fmt_us(measured.median - base.median)})",
            ratio=spread.median,
            spread=spread,
            data={"baseline_us": base.rounds, "measured_us": measured.rounds},
        )
        if page == TARGET_PAGE:
            row.target = f"<= {GROWTH_TARGET:.1f}x"
            row.met = spread.median <= GROWTH_TARGET
            row.note = (
                f"each cell: the tag page (value reads, hooks, script) vs the plain page with "
                f"the same blocks and links; {rounds} interleaved rounds x {iterations} "
                f"direct ASGI calls over all {len(apps)} pages, CPU time"
            )
        rows.append(row)
    return rows
