"""Cross-process single-flight: one process fetches, the others wait for its result.

``FetchLeases.coordinate`` claims the lease of (identity, context, keys, generation): the
holder checks the budget, fetches, writes L2 and marks the lease done; the others poll the
lease and take the holder's results from L2, or its failure, or the lease when it expired
(the holder died). The lease key carries the identity's generation, so a fetch begun after
an invalidation never waits for, nor takes the results of, a fetch begun before it.
"""

from __future__ import annotations

import asyncio
import enum
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from typing import Any

from ..._exceptions import APIError, CircuitOpenError
from ..._interfaces import FetchFn
from ..._models import CachedExperience, FetchQuery
from ._budget import SharedBudget, call_cost
from ._codec import DONE, FAILED, RELEASE
from ._connection import RedisConnection, RedisStats, Unavailable
from ._keys import KeyNames

__all__ = ["FetchLeases", "StoredEntries", "Written"]

_POLL_DELAYS = (0.005, 0.01, 0.02, 0.03, 0.05)  # then every 50 ms
_STALL_RETRIES = 3  # attempts at the writes other processes wait for


class Written(enum.Enum):
    """What became of a write to L2."""

    OK = "ok"
    STALE = "stale"  # the identity was invalidated since the fetch began: not written
    DOWN = "down"  # Redis could not be asked


class StoredEntries(dict[str, CachedExperience]):
    """Entries already in L2 (``retention`` they were written with, ``None`` if another
    process wrote them): the store's ``set`` that follows ``coordinate`` then skips."""

    __slots__ = ("retention",)

    def __init__(self, entries: Mapping[str, CachedExperience], retention: float | None):
        super().__init__(entries)
        self.retention = retention


Decode = Callable[[list[str], Any], dict[str, CachedExperience]]
Write = Callable[
    [FetchQuery, Mapping[str, CachedExperience], float, str | None], Awaitable[Written]
]
Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class FetchLeases:
    """The lease protocol of one ``RedisSharedLayer`` (which passes its own parts in)."""

    def __init__(
        self,
        *,
        conn: RedisConnection,
        names: KeyNames,
        scripts: dict[str, Any],
        stats: RedisStats,
        budget: SharedBudget,
        lease_ttl: float,
        max_wait: float,
        decode: Decode,
        write: Write,
        retention: Callable[[], float],
        spawn: Spawn,
    ) -> None:
        self._conn = conn
        self._names = names
        self._scripts = scripts  # filled in when the client connects
        self.stats = stats
        self._budget = budget
        self.lease_ttl = lease_ttl
        self.max_wait = max_wait
        self._decode = decode
        self._write = write
        self._retention = retention
        self._spawn = spawn

    async def coordinate(
        self, query: FetchQuery, keys: Collection[str], fetch: FetchFn, generation: str | None
    ) -> dict[str, CachedExperience]:
        wanted = list(dict.fromkeys(keys))
        self._budget.check_local_hints()
        try:
            self._conn.client()
        except Unavailable:
            return await self._fetch_degraded(wanted, fetch)
        if not wanted:
            return await fetch()
        names = self._names
        lease = names.lease(query, wanted, generation or "")
        claim_keys = [lease, names.pause, names.data(query.identity_hash)]
        fields = [names.field(query, k) for k in wanted]
        token = secrets.token_hex(8)
        claim_args = [token, math.ceil(self.lease_ttl * 1000), *fields]
        deadline = time.monotonic() + self.max_wait
        polls = 0
        waited = False
        while True:
            try:
                reply = await self._conn.run(
                    "claim", lambda c: self._scripts["claim"](keys=claim_keys, args=claim_args)
                )
            except Unavailable as exc:
                if exc.down:
                    return await self._fetch_degraded(wanted, fetch)
                state = "stalled"  # ask again shortly: fetching now could duplicate a fetch
            else:
                state = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if state == "acquired":
                if waited:
                    self.stats.lease_takeovers += 1
                return await self._fetch_as_holder(query, wanted, fetch, lease, token, generation)
            if state == "paused":
                raise self._budget.paused_for(int(reply[1]) / 1000)
            if state == DONE:
                found = self._decode(wanted, reply[2] if len(reply) > 2 else None)
                if len(found) == len(wanted):
                    self.stats.lease_served += 1
                    return StoredEntries(found, None)
                # Gone since (invalidated, flushed, too big to share): fetch ourselves.
                return await self._fetch_unleased(wanted, fetch)
            if state == FAILED:
                self.stats.lease_failed += 1
                raise CircuitOpenError("the same fetch just failed in another process")
            if state == "held" and not waited:
                waited = True
                self.stats.lease_waits += 1
            if time.monotonic() >= deadline:
                self.stats.lease_timeouts += 1
                return await self._fetch_unleased(wanted, fetch)
            await asyncio.sleep(_POLL_DELAYS[min(polls, len(_POLL_DELAYS) - 1)])
            polls += 1

    async def _fetch_degraded(self, keys: list[str], fetch: FetchFn) -> dict[str, CachedExperience]:
        self.stats.degraded += 1
        self._budget.take_local_share(call_cost(len(keys)))
        return await self._budget.call(fetch)

    async def _fetch_unleased(self, keys: list[str], fetch: FetchFn) -> dict[str, CachedExperience]:
        await self._budget.take(len(keys))
        return await self._budget.call(fetch)

    async def _fetch_as_holder(
        self,
        query: FetchQuery,
        keys: list[str],
        fetch: FetchFn,
        lease: str,
        token: str,
        generation: str | None,
    ) -> dict[str, CachedExperience]:
        self.stats.lease_acquired += 1
        renewer = self._spawn(self._renew(lease, token))
        outcome = RELEASE  # no call made (or nothing shared): a waiter may take over
        try:
            try:
                entries = await self._fetch_unleased(keys, fetch)
            except CircuitOpenError:
                raise
            except APIError:  # the upstream failed, or the budget is spent
                outcome = FAILED
                raise
            retention = self._retention()
            for _ in range(_STALL_RETRIES):  # waiters depend on this write: insist a little
                written = await self._write(query, entries, retention, generation)
                if written is Written.OK:
                    outcome = DONE
                    return StoredEntries(entries, retention)
                if written is Written.STALE:
                    self.stats.l2_stale_writes += 1
                    break
                if self._conn.is_degraded:
                    break
            return entries
        finally:
            renewer.cancel()
            await self._release(lease, token, outcome)

    async def _release(self, lease: str, token: str, outcome: str) -> None:
        ms = math.ceil((self.lease_ttl if outcome == DONE else min(self.lease_ttl, 1.0)) * 1000)
        for _ in range(_STALL_RETRIES):  # else waiters wait for the lease to expire
            try:
                await self._conn.run(
                    "release",
                    lambda c: self._scripts["release"](keys=[lease], args=[token, outcome, ms]),
                )
                return
            except Unavailable as exc:
                if exc.down:
                    return

    async def _renew(self, lease: str, token: str) -> None:
        """Keep the lease while the fetch runs: it expires only if this process dies."""
        ms = math.ceil(self.lease_ttl * 1000)
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                kept = await self._conn.run(
                    "renew", lambda c: self._scripts["renew"](keys=[lease], args=[token, ms])
                )
            except Unavailable:
                continue
            if not kept:
                return
