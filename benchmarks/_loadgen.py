"""A Python load generator, used when ``wrk`` is not installed.

``python -m benchmarks._loadgen URL SECONDS CONNECTIONS [HEADER: VALUE ...]`` keeps
CONNECTIONS keep-alive requests in flight (httpx, asyncio) for SECONDS and prints one
JSON line: ``{"requests": N, "seconds": S, "errors": E}``. It is slower than ``wrk``,
so it loads the server less and the ratio it gives understates a difference.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx

__all__ = ["main"]


async def _load(url: str, seconds: float, connections: int, headers: dict[str, str]) -> None:
    done = errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=10) as client:
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < deadline:
                try:
                    response = await client.get(url)
                    await response.aread()
                    if response.status_code == 200:
                        done += 1
                    else:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - started
    print(json.dumps({"requests": done, "seconds": elapsed, "errors": errors}))


def main() -> None:
    url, seconds, connections = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    headers = dict(h.split(": ", 1) for h in sys.argv[4:])
    asyncio.run(_load(url, seconds, connections, headers))


if __name__ == "__main__":
    main()
