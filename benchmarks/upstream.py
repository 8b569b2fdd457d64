"""Cold misses, coalescing and a slow upstream, against the real HTTP client talking to a
local MoEngage stand-in over HTTP (``_standin.py``, its own process, latency by
``asyncio.sleep`` there). The page app runs in this process, driven by direct ASGI calls.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp

from personalize_middleware import PersonalizeClient, PersonalizeSettings
from personalize_middleware._middleware import DEFAULT_LATENCY_BUDGET

from ._apps import BROWSER_HEADERS, KEYS, build_app, header_identity
from ._asgi import lifespan, make_scope, request
from ._report import Row, fmt_ms, paired
from ._standin import StandIn

__all__ = ["run"]

HANDLER_SECONDS = 0.050
UPSTREAM_SECONDS = 0.080
SLOW_UPSTREAM_SECONDS = 2.0
COLD_TARGET = 1.10
SLOW_MARGIN = 0.020


def _scope(user: str) -> dict[str, Any]:
    return make_scope("/", headers=(*BROWSER_HEADERS, (b"x-bench-user", user.encode())))


async def _page_seconds(app: ASGIApp, user: str, marker: bytes | None = None) -> float:
    started = time.perf_counter()
    response = await request(app, _scope(user))
    elapsed = time.perf_counter() - started
    assert response.status == 200, response.status
    if marker is not None:
        assert marker in response.body, f"page for {user} was not personalized"
    return elapsed


def _settings(standin: StandIn) -> PersonalizeSettings:
    return PersonalizeSettings(
        workspace_id="BENCHWORKSPACE", api_secret="bench-api-secret", base_url=standin.base_url
    )


def _personalized(standin: StandIn, **options: Any) -> ASGIApp:
    return build_app(
        "tag",
        settings=_settings(standin),
        identify=header_identity,
        **options,
    )


async def _cold_miss(standin: StandIn, times: int) -> list[Row]:
    standin.reset(delay=UPSTREAM_SECONDS)
    async with PersonalizeClient(_settings(standin)) as client:

        async def naive_fetch(key: str, request: Request) -> None:
            await client.fetch_experiences([key], customer_id=request.headers["x-bench-user"])

        apps: dict[str, ASGIApp] = {
            "handler": build_app("plain", handler_seconds=HANDLER_SECONDS),
            "naive": build_app("plain", handler_seconds=HANDLER_SECONDS, naive_fetch=naive_fetch),
            "early": _personalized(standin, handler_seconds=HANDLER_SECONDS),
        }

        async def upstream(i: int) -> float:
            started = time.perf_counter()
            await client.fetch_experiences(KEYS, customer_id=f"direct-{i}")
            return time.perf_counter() - started

        measures: dict[str, Callable[[int], Awaitable[float]]] = {
            "upstream": upstream,
            "handler": lambda i: _page_seconds(apps["handler"], f"h{i}"),
            "naive": lambda i: _page_seconds(apps["naive"], f"n{i}"),
            "early": lambda i: _page_seconds(
                apps["early"], f"cold-{i}", f"home-hero for cold-{i}".encode()
            ),
        }
        seconds: dict[str, list[float]] = {name: [] for name in measures}
        async with lifespan(apps["early"]):
            for app in apps.values():
                await _page_seconds(app, "warm-up")  # connections, template compilation
            names = list(measures)
            for i in range(times):  # interleaved, the order rotating: drift hits all alike
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    seconds[name].append(await measures[name](i))
    ideal = [max(h, u) for h, u in zip(seconds["handler"], seconds["upstream"], strict=True)]
    versus_ideal = paired(seconds["early"], ideal)
    versus_naive = paired(seconds["early"], seconds["naive"])
    handler_s, upstream_s = (statistics.median(seconds[n]) for n in ("handler", "upstream"))
    naive_s, early_s = (statistics.median(seconds[n]) for n in ("naive", "early"))
    return [
        Row(
            section="cold miss",
            name="page vs max(handler, upstream)",
            baseline=(
                f"{fmt_ms(statistics.median(ideal))} = max({fmt_ms(handler_s)}, "
                f"{fmt_ms(upstream_s)})"
            ),
            measured=fmt_ms(early_s),
            ratio=versus_ideal.median,
            spread=versus_ideal,
            target=f"<= {COLD_TARGET:.2f}x",
            met=versus_ideal.median <= COLD_TARGET,
            note=(
                f"handler awaits {HANDLER_SECONDS * 1000:.0f} ms; the stand-in answers after "
                f"{UPSTREAM_SECONDS * 1000:.0f} ms over real HTTP; both baselines measured "
                f"(handler: the page without the middleware; upstream: a direct client call); "
                f"{times} cold users, the four measured in turn per user, ratio = median of "
                f"the per-user ratios; {early_s / UPSTREAM_SECONDS:.2f}x the nominal "
                f"{UPSTREAM_SECONDS * 1000:.0f} ms"
            ),
        ),
        Row(
            section="cold miss",
            name="page vs naive (one fetch per key, then render)",
            baseline=f"{fmt_ms(naive_s)} (naive)",
            measured=fmt_ms(early_s),
            ratio=versus_naive.median,
            spread=versus_naive,
        ),
    ]


async def _coalescing(standin: StandIn, concurrent: int) -> list[Row]:
    # A long budget: every page waits for its answer, so each can be checked for its user.
    app = _personalized(standin, latency_budget=10.0)
    rows = []
    async with lifespan(app):
        for label, users in (
            ("one user", ["same-user"] * concurrent),
            ("distinct users", [f"user-{i}" for i in range(concurrent)]),
        ):
            standin.reset(delay=UPSTREAM_SECONDS)
            await asyncio.gather(
                *(_page_seconds(app, u, f"home-hero for {u}".encode()) for u in users)
            )
            calls = standin.counters()["fetch_calls"]
            expected = len(set(users))
            rows.append(
                Row(
                    section="coalescing",
                    name=f"{concurrent} concurrent cold requests, {label}",
                    baseline=f"{expected} call(s) expected",
                    measured=f"{calls} upstream call(s)",
                    ratio=calls / expected,
                    target=f"= {expected}",
                    met=calls == expected,
                    note="every page checked to show its own user's variation (budget 10 s)"
                    if label == "distinct users"
                    else "",
                )
            )
    return rows


async def _slow_upstream(standin: StandIn, users: int, wave: int) -> list[Row]:
    budget = DEFAULT_LATENCY_BUDGET
    app = _personalized(standin)
    standin.reset(delay=SLOW_UPSTREAM_SECONDS)
    times: list[float] = []
    async with lifespan(app):
        for start in range(0, users, wave):
            times.extend(
                await asyncio.gather(
                    *(_page_seconds(app, f"slow-{i}") for i in range(start, start + wave))
                )
            )
    times.sort()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return [
        Row(
            section="slow upstream",
            name=f"p99 page time, upstream at {SLOW_UPSTREAM_SECONDS:.0f} s",
            baseline=f"{fmt_ms(budget)} (latency budget)",
            measured=f"p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)}",
            ratio=p99 / budget,
            target=f"p99 <= budget + {SLOW_MARGIN * 1000:.0f} ms",
            met=p99 <= budget + SLOW_MARGIN,
            note=(
                f"{users} cold users in waves of {wave} concurrent requests; the handler "
                "has no awaits of its own, so the page waits the whole budget, then renders "
                "defaults"
            ),
        )
    ]


async def run(*, quick: bool) -> list[Row]:
    with StandIn() as standin:
        rows = await _cold_miss(standin, 5 if quick else 15)
        rows += await _coalescing(standin, 100)
        rows += await _slow_upstream(standin, 40 if quick else 200, 10)
    return rows
