"""Events through the outbox: the in-memory queue against the SQLite and Redis outboxes.

``python -m benchmarks.outbox [--events N] [--rounds R] [--concurrency C]``

Each run stores ``N`` actions as beacons of 4 (one page view's impressions and click),
``C`` beacons at a time, through ``EventBatcher.store`` (what the beacon endpoint awaits
before answering 204), then flushes them to an in-process events backend that answers at
once. Figures per outbox: actions stored per second, actions delivered per second (first
store to last delivery), and the time one beacon waits for its store (p50 / p99). The
three outboxes run in every round in a rotating order (interleaved A/B, fresh outbox each
run); medians over the rounds with their min-max. Redis is ``127.0.0.1:6379`` unless
``PERSONALIZE_BENCH_REDIS_URL`` says otherwise (skipped when none answers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from personalize_middleware import (
    EventElement,
    ExperienceMetadata,
    MemoryOutbox,
    RedisOutbox,
    SQLiteOutbox,
)
from personalize_middleware._interfaces import EventOutbox
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN, EventAction
from personalize_middleware.tracking._batcher import EventBatcher

__all__ = ["main"]

REDIS_URL = os.environ.get("PERSONALIZE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
EVENTS_PER_BEACON = 4
CONTEXT = {
    "cid": "66d55ae445921e4d35ae4368_hero",
    "experience": "Homepage hero",
    "moe_locale_id": "0",
    "moe_variation_id": "2",
    "audience_name": "All Users",
    "audience_id": "5A",
    "type": "Web Personalization",
}


class CountingBackend:
    """An events backend that accepts every call at once and counts the actions."""

    def __init__(self) -> None:
        self.delivered = 0

    async def track_events(self, elements: Sequence[EventElement]) -> None:
        self.delivered += sum(len(e["actions"]) for e in elements)

    async def fetch_experiences(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}

    async def fetch_metadata(self, statuses: Any = None) -> list[ExperienceMetadata]:
        return []

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass


def _beacons(count: int, visitors: int) -> list[list[tuple[str, EventAction]]]:
    now = int(time.time())
    out = []
    for n in range(count):
        customer = f"visitor-{n % visitors}"
        beacon = []
        for i in range(EVENTS_PER_BEACON):
            action: EventAction = {
                "action": ACTION_CLICKED if i == EVENTS_PER_BEACON - 1 else ACTION_SHOWN,
                "moe_event_uuid": str(uuid.uuid4()),
                "event_time": now,
                "platform": "web",
                "attributes": dict(CONTEXT),
            }
            beacon.append((customer, action))
        out.append(beacon)
    return out


def _outbox(kind: str, folder: Path) -> EventOutbox:
    if kind == "memory":
        return MemoryOutbox(max_queue=10**6)
    if kind == "sqlite":
        return SQLiteOutbox(folder / f"{secrets.token_hex(4)}.sqlite", max_queue=10**6)
    return RedisOutbox(REDIS_URL, workspace_id="bench" + secrets.token_hex(4), max_queue=10**6)


async def _run_once(kind: str, folder: Path, events: int, concurrency: int) -> dict[str, float]:
    backend = CountingBackend()
    outbox = _outbox(kind, folder)
    batcher = EventBatcher(backend, outbox=outbox, flush_interval=0.05)  # type: ignore[arg-type]
    await batcher.start()
    beacons = _beacons(events // EVENTS_PER_BEACON, visitors=max(1, events // 40))
    waits: list[float] = []
    queue = iter(beacons)

    async def client() -> None:
        for beacon in queue:
            started = time.perf_counter()
            assert await batcher.store(beacon)
            waits.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    stored = time.perf_counter() - started
    await batcher.flush()
    delivered = time.perf_counter() - started
    await batcher.aclose()
    if isinstance(outbox, RedisOutbox):
        await _drop_stream(outbox)
    total = len(beacons) * EVENTS_PER_BEACON
    assert backend.delivered == total, (kind, backend.delivered, total)
    waits.sort()
    return {
        "stored_per_s": total / stored,
        "delivered_per_s": total / delivered,
        "wait_p50_ms": waits[len(waits) // 2] * 1000,
        "wait_p99_ms": waits[int(len(waits) * 0.99)] * 1000,
    }


async def _drop_stream(outbox: RedisOutbox) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.delete(outbox.stream_key, outbox.counts_key)
    finally:
        await client.aclose()


async def _redis_answers() -> bool:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return False
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


def _spread(values: list[float], unit: str, digits: int = 0) -> str:
    return (
        f"{statistics.median(values):,.{digits}f} {unit} "
        f"({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    )


async def run(events: int, rounds: int, concurrency: int) -> list[str]:
    kinds = ["memory", "sqlite"] + (["redis"] if await _redis_answers() else [])
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as folder:
        await _run_once("memory", Path(folder), min(events, 2_000), concurrency)  # warm-up
        for n in range(rounds):
            order = kinds[n % len(kinds) :] + kinds[: n % len(kinds)]  # rotate: A/B interleaved
            for kind in order:
                results[kind].append(await _run_once(kind, Path(folder), events, concurrency))
    memory = statistics.median(r["delivered_per_s"] for r in results["memory"])
    lines = [
        f"{events:,} actions in beacons of {EVENTS_PER_BEACON}, {concurrency} concurrent, "
        f"{rounds} rounds; median (min-max)",
        f"{'outbox':<8} {'stored':>28} {'delivered':>28} {'vs memory':>10} "
        f"{'beacon wait p50':>24} {'p99':>22}",
    ]
    for kind in kinds:
        rows = results[kind]
        delivered = [r["delivered_per_s"] for r in rows]
        lines.append(
            f"{kind:<8} {_spread([r['stored_per_s'] for r in rows], 'ev/s'):>28} "
            f"{_spread(delivered, 'ev/s'):>28} "
            f"{statistics.median(delivered) / memory:>9.2f}x "
            f"{_spread([r['wait_p50_ms'] for r in rows], 'ms', 2):>24} "
            f"{_spread([r['wait_p99_ms'] for r in rows], 'ms', 2):>22}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outbox", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    for line in asyncio.run(run(args.events, args.rounds, args.concurrency)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
