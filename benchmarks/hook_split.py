"""``python -m benchmarks.hook_split``: where the full page's hooks and script spend their
time, by switching one piece off at a time (A/B in interleaved rounds, CPU time).

Rows, each the same full page (3 experiences, 9 reads, 6 hooks, script) except:

- ``tag``: no hooks and no script at all (the tag page without hooks);
- ``constant hooks``: every hook returns a ready attribute (Jinja's dispatch of the hook
  calls stays, the tracking work goes);
- ``no script tag``: ``personalize_script()`` renders nothing and no manifest is
  appended (the manifest and its signature go);
- ``full``: the page as served.

So ``full - constant hooks`` is the hooks' tracking work with the script's,
``constant hooks - tag`` Jinja's dispatch of the seven calls, ``full - no script tag``
the script tag with the page's manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from markupsafe import Markup

from ._apps import preset_app
from ._asgi import find_middleware, lifespan, request, timed
from ._report import Spread
from .inprocess import hit_scope

__all__ = ["main"]

_ATTRIBUTE = Markup(' data-pz-click="~0"')


async def _run(rounds: int, iterations: int) -> dict[str, Any]:
    apps = {
        "tag": preset_app("tag"),
        "constant hooks": preset_app("full"),
        "no script tag": preset_app("full"),
        "full": preset_app("full"),
    }
    scope = hit_scope()
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(lifespan(app))
        constant = find_middleware(apps["constant hooks"]).tracking
        quiet = find_middleware(apps["no script tag"]).tracking
        assert constant is not None and quiet is not None
        constant.impression_attrs = lambda handle, experience: _ATTRIBUTE  # type: ignore[method-assign]
        constant.click_attrs = lambda handle, experience, b_id: _ATTRIBUTE  # type: ignore[method-assign]
        quiet.script_tag = lambda nonce=None, root_path="", page=None: Markup("")  # type: ignore[method-assign]
        quiet.pending_manifest = lambda page: ""  # type: ignore[method-assign]
        for app in apps.values():
            for _ in range(3):
                assert (await request(app, scope)).status == 200
        return await timed(apps, scope, iterations=iterations, rounds=rounds)


def main() -> None:
    timings = asyncio.run(_run(rounds=31, iterations=300))
    base = timings["tag"]
    print("full page, 3 experiences x 6 hooks + script; median CPU µs per request (IQR)")
    for name, timing in timings.items():
        q1, q3 = Spread(timing.rounds).quartiles
        added = timing.median - base.median
        print(f"  {name:15} {timing.median:7.1f} µs ({q1:.1f}-{q3:.1f})  {added:+6.1f} vs tag")
    full, constant, quiet = timings["full"], timings["constant hooks"], timings["no script tag"]
    print(f"Jinja's dispatch of the hooks and script: {constant.median - base.median:5.1f} µs")
    print(f"the hooks' and script's tracking work:    {full.median - constant.median:5.1f} µs")
    print(f"  of which the script tag and manifest:   {full.median - quiet.median:5.1f} µs")


if __name__ == "__main__":
    main()
