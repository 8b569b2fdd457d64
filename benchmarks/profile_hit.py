"""Profile the cache-hit path: ``python -m benchmarks.profile_hit [--iterations N]``.

Runs the personalized page (cache hit) under cProfile and prints the top functions by
own time, so a change to the hot path can be checked for where the time goes."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats

from ._apps import BROWSER_HEADERS, Variant, build_app, visitor_cookie
from ._asgi import lifespan, make_scope, request, timed

__all__ = ["main"]


async def _profile(iterations: int, variant: Variant, sort: str, limit: int) -> None:
    app = build_app(variant)
    scope = make_scope("/", headers=(*BROWSER_HEADERS, (b"cookie", visitor_cookie().encode())))
    async with lifespan(app):
        await request(app, scope)
        await timed({"warm": app}, scope, iterations=200, rounds=1)
        profiler = cProfile.Profile()
        profiler.enable()
        await timed({"profiled": app}, scope, iterations=iterations, rounds=1)
        profiler.disable()
    pstats.Stats(profiler).sort_stats(sort).print_stats(limit)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_hit")
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument(
        "--variant",
        choices=["personalized", "direct", "baseline", "growthbook"],
        default="personalized",
    )
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--limit", type=int, default=45)
    args = parser.parse_args()
    asyncio.run(_profile(args.iterations, args.variant, args.sort, args.limit))


if __name__ == "__main__":
    main()
