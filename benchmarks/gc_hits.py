"""Garbage collection under cache hits, with a full cache: the full page's app holds
100,000 users (each its own signed visitor cookie, filled through the middleware's real
path), then serves cache hits to users drawn at random from them; the plain page serves
the same users' requests in the same process (the same heap), rounds interleaved.
Collections per generation come from ``gc.get_stats()`` deltas, time in the collector
from ``gc.callbacks``.
"""

from __future__ import annotations

import gc
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

from personalize_middleware import Experience
from personalize_middleware._identity import VisitorCookie
from personalize_middleware._signing import Keyring

from ._apps import BROWSER_HEADERS, FULL_PAGE, SECRET, InstantBackend, build_app, experience_body
from ._asgi import find_middleware, lifespan, make_scope, same_hour
from ._report import Row, paired

__all__ = ["run"]

PER_ROUND = 1000


@dataclass
class _Batch:
    collections: tuple[int, int, int]
    collected: int  # objects the collector freed: garbage in reference cycles
    gc_seconds: float
    max_pause: float

    @property
    def total(self) -> int:
        return sum(self.collections)


@dataclass
class _Clock:
    """A ``gc.callbacks`` entry timing every collection in CPU time (on a shared machine a
    wall-clock pause would count time spent descheduled)."""

    seconds: float = 0.0
    max_pause: float = 0.0
    _started: float = field(default=0.0, repr=False)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            pause = time.thread_time() - self._started
            self.seconds += pause
            self.max_pause = max(self.max_pause, pause)


def _visitor_id(i: int, attempt: int) -> str:
    return f"gcVisitor{attempt}{i:012d}"  # the 22-character shape of a real visitor id


def _scopes(
    cookies: VisitorCookie, users: Sequence[int], path: str, attempt: int
) -> list[dict[str, Any]]:
    out = []
    for i in users:
        visitor = _visitor_id(i, attempt)
        cookie = cookies.set_cookie_header(visitor, secure=False).split(b";", 1)[0]
        out.append(make_scope(path, headers=(*BROWSER_HEADERS, (b"cookie", cookie))))
    return out


async def _batch(app: ASGIApp, scopes: list[dict[str, Any]]) -> _Batch:
    clock = _Clock()
    before = gc.get_stats()
    gc.callbacks.append(clock)
    try:
        for scope in scopes:
            await app(scope, _receive, _discard)
    finally:
        gc.callbacks.remove(clock)
    after = gc.get_stats()
    counts = [a["collections"] - b["collections"] for a, b in zip(after, before, strict=True)]
    collected = sum(a["collected"] - b["collected"] for a, b in zip(after, before, strict=True))
    return _Batch((counts[0], counts[1], counts[2]), collected, clock.seconds, clock.max_pause)


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _discard(message: Message) -> None:
    return None


class _ParsedBackend(InstantBackend):
    """Answers every user with experiences parsed once, up front: the fill is about the
    cache's contents, not the cost of parsing 100,000 answers (which ``coldpath`` and
    ``memory`` measure)."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__()
        answer = json.loads(experience_body(keys, "everyone"))["experiences"]
        self.answer = {k: Experience.from_api(k, v) for k, v in answer.items()}

    async def fetch_experiences(self, keys: Iterable[str], **kwargs: Any) -> dict[str, Experience]:
        self.calls += 1
        return {k: self.answer[k] for k in keys}


async def _fill(app: ASGIApp, cookies: VisitorCookie, users: int, attempt: int) -> None:
    for start in range(0, users, 1000):
        batch = range(start, min(users, start + 1000))
        for scope in _scopes(cookies, batch, "/_fill", attempt):
            await app(scope, _receive, _discard)


async def run(*, quick: bool) -> list[Row]:
    users, rounds = (10_000, 3) if quick else (100_000, 9)
    keys = list(FULL_PAGE.keys)
    full = build_app(
        "tag",
        page=FULL_PAGE,
        backend=_ParsedBackend(keys),
        routes={"/": keys, "/_fill": keys},
        cache_ttl=3600.0,  # no entry goes stale during the run
        cache_maxsize=users,
    )
    plain = build_app("plain", page=FULL_PAGE)
    cookies = VisitorCookie(Keyring([SECRET]))
    order = random.Random(20).sample(range(users), PER_ROUND * rounds)
    attempts = itertools.count()

    async def measure() -> tuple[dict[str, list[_Batch]], float, float]:
        attempt = next(attempts)  # fresh visitors if the hour made us measure again
        batches: dict[str, list[_Batch]] = {"plain": [], "full": []}
        started = time.monotonic()
        await _fill(full, cookies, users, attempt)
        fill_seconds = time.monotonic() - started
        store = find_middleware(full).store
        assert len(store) == users, f"{len(store)} users cached, not {users}"
        gc.collect()  # what the fill left behind
        full_pass = time.thread_time()
        gc.collect()  # what a gen2 collection costs with the cache full
        full_pass = time.thread_time() - full_pass
        apps: dict[str, ASGIApp] = {"plain": plain, "full": full}
        for r in range(rounds):
            scopes = _scopes(cookies, order[r * PER_ROUND : (r + 1) * PER_ROUND], "/", attempt)
            for name in ("plain", "full") if r % 2 == 0 else ("full", "plain"):
                hits, calls = store.stats.hits, store.stats.upstream_calls
                batch = await _batch(apps[name], [dict(s) for s in scopes])
                batches[name].append(batch)
                if name == "full":
                    assert store.stats.hits - hits == len(keys) * PER_ROUND, "not all hits"
                    assert store.stats.upstream_calls == calls, "a request went upstream"
        return batches, fill_seconds, full_pass

    async with lifespan(full), lifespan(plain):
        batches, fill_seconds, full_pass = await same_hour(measure)
    return [
        _row(
            "collections per 1,000 cache hits, gen0/gen1/gen2",
            batches,
            lambda b: float(b.total),
            _collections_text,
            note=(
                f"{users:,} users in L1 (filled through the middleware in {fill_seconds:.0f} s; "
                f"interned answers); {rounds} interleaved rounds of {PER_ROUND:,} requests, "
                "each a different cached user; collections and freed objects are means per "
                "1,000 requests (a gen2 collection is rare, a median would hide it); ratio "
                "on the per-round totals; freed = garbage in reference cycles; one full "
                f"collection (gen2) with the cache full: {full_pass * 1000:,.0f} ms of CPU"
            ),
        ),
        _row(
            "CPU in the collector per 1,000 cache hits",
            batches,
            lambda b: b.gc_seconds,
            lambda bs: (
                f"{statistics.mean(b.gc_seconds for b in bs) * 1000:,.1f} ms "
                f"(longest collection {max(b.max_pause for b in bs) * 1000:,.1f} ms)"
            ),
        ),
    ]


def _collections_text(batches: list[_Batch]) -> str:
    means = [statistics.mean(b.collections[g] for b in batches) for g in range(3)]
    freed = statistics.mean(b.collected for b in batches)
    return "/".join(f"{m:.3g}" for m in means) + f", {freed:,.0f} freed"


def _row(
    name: str,
    batches: dict[str, list[_Batch]],
    value: Callable[[_Batch], float],
    text: Callable[[list[_Batch]], str],
    note: str = "",
) -> Row:
    plain = [value(b) for b in batches["plain"]]
    full = [value(b) for b in batches["full"]]
    spread = paired(full, plain) if all(plain) else None
    return Row(
        section="gc",
        name=name,
        baseline=f"{text(batches['plain'])} (plain page, same users)",
        measured=f"{text(batches['full'])} (full page)",
        ratio=spread.median if spread else None,
        spread=spread,
        note=note,
        data={
            name: [(b.collections, b.collected, b.gc_seconds, b.max_pause) for b in bs]
            for name, bs in batches.items()
        },
    )
