"""The cold path's CPU, printed beside the cache-hit figures: what one upstream fetch
costs this process (client side: the real ``PersonalizeClient`` against the local HTTP
stand-in, ``_standin.py``, in its own process so its CPU is not counted), and what a
whole cold-miss page costs (miss, fetch, cache fill, render), each against the same app's
cache hit, in interleaved rounds. The clock is this thread's CPU time, so the wait for
the stand-in's answer does not count.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable

from personalize_middleware import PersonalizeClient

from ._apps import BROWSER_HEADERS, FULL_PAGE, KEYS, build_app, header_identity
from ._asgi import lifespan, make_scope, request, same_hour
from ._report import Row, Spread, fmt_us, paired
from ._standin import StandIn
from .upstream import _settings

__all__ = ["run"]


def _scope(user: str) -> dict[str, object]:
    return make_scope("/", headers=(*BROWSER_HEADERS, (b"x-bench-user", user.encode())))


async def _cpu_us(count: int, op: Callable[[int], Awaitable[None]]) -> float:
    started = time.thread_time()
    for i in range(count):
        await op(i)
    return (time.thread_time() - started) / count * 1e6


async def run(*, quick: bool) -> list[Row]:
    count, rounds = (30, 3) if quick else (100, 9)
    with StandIn() as standin:
        standin.reset(delay=0.0)
        settings = _settings(standin)
        app = build_app(
            "tag",
            page=FULL_PAGE,
            settings=settings,
            identify=header_identity,
            metadata_refresh=None,
        )
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(lifespan(app))
            client = await stack.enter_async_context(PersonalizeClient(settings))
            attempts = itertools.count()

            async def measure() -> dict[str, list[float]]:
                results: dict[str, list[float]] = {"hit": [], "cold": [], "fetch": []}
                attempt = next(attempts)  # fresh user names if the hour made us measure again
                hot = _scope(f"hot-user-{attempt}")
                for _ in range(3):  # connections open, templates compiled, hot user cached
                    await client.fetch_experiences(KEYS, customer_id="warm-up")
                    assert (await request(app, hot)).status == 200
                round_no = 0

                async def hit(i: int) -> None:
                    await request(app, hot)

                async def cold(i: int) -> None:
                    user = f"cold-{attempt}-{round_no}-{i}"
                    response = await request(app, _scope(user))
                    assert f"home-hero for {user}".encode() in response.body, "not personalized"

                async def fetch(i: int) -> None:
                    who = f"direct-{attempt}-{round_no}-{i}"
                    assert len(await client.fetch_experiences(KEYS, customer_id=who)) == len(KEYS)

                ops = {"hit": hit, "cold": cold, "fetch": fetch}
                names = list(ops)
                standin.reset(delay=0.0)
                for round_no in range(rounds):
                    for name in names[round_no % 3 :] + names[: round_no % 3]:
                        await asyncio.sleep(0)
                        results[name].append(await _cpu_us(count, ops[name]))
                calls = standin.counters()["fetch_calls"]
                assert calls == 2 * count * rounds, f"{calls} upstream calls, not one per cold op"
                return results

            results = await same_hour(measure)
    hit_us = Spread(results["hit"]).median
    how = (
        f"{rounds} interleaved rounds x {count}; the stand-in answers at once over real HTTP "
        "(keep-alive); CPU time of this thread"
    )
    rows = []
    for name, label in (
        ("fetch", "CPU per upstream fetch (PersonalizeClient, 3 keys)"),
        ("cold", "CPU of a cold-miss page (miss, fetch, fill, render)"),
    ):
        spread = paired(results[name], results["hit"])
        rows.append(
            Row(
                section="cold path",
                name=label,
                baseline=f"{fmt_us(hit_us)} (the full page, cache hit)",
                measured=fmt_us(Spread(results[name]).median),
                ratio=spread.median,
                spread=spread,
                note=how if name == "fetch" else "",
                data={"hit_us": results["hit"], "measured_us": results[name]},
            )
        )
    return rows
