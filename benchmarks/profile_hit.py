"""``python -m benchmarks.profile_hit [--variant full] [--experiences N --hooks H]``:
cProfile of cache hits on one benchmark page (a name from ``_apps.PRESETS``, or the tag
page of any size), so a change to the hot path can be checked for where the time goes."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats

from ._apps import PRESETS, Page, build_app, preset_app
from ._asgi import lifespan, request, timed
from .inprocess import hit_scope

__all__ = ["main"]


async def _profile(iterations: int, variant: str, page: Page | None, sort: str, limit: int) -> None:
    app = build_app("tag", page=page) if page is not None else preset_app(variant)
    scope = hit_scope()
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
    parser.add_argument("--variant", choices=sorted(PRESETS), default="full")
    parser.add_argument("--experiences", type=int, help="with --hooks: a tag page this size")
    parser.add_argument("--hooks", type=int, default=6)
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--limit", type=int, default=45)
    args = parser.parse_args()
    page = Page(args.experiences, args.hooks) if args.experiences else None
    asyncio.run(_profile(args.iterations, args.variant, page, args.sort, args.limit))


if __name__ == "__main__":
    main()
