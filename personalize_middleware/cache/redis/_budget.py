"""The workspace's fetch budget as one process sees it: the shared limiter while Redis
answers, this process's share while it does not, and the pause a 429 imposes on all.

Redis answering: every call is granted by ``RedisRateLimiter`` (``_limiter.py``). Redis
down (an outage): ``LocalShare`` keeps this process to its share, and the calls it made
meanwhile are added to the shared log on the first grant after recovery. Redis stalling
(slow, not down): the call is not made, since calling unchecked could overspend.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

from ..._contract import FETCH_BATCH_SIZE
from ..._exceptions import CircuitOpenError, RateLimitedError
from ..._interfaces import FetchFn
from ..._models import CachedExperience
from ..._retry import DEFAULT_RETRY_POLICY
from ._connection import RedisConnection, RedisStats, Unavailable
from ._limiter import LocalShare, RedisRateLimiter

__all__ = ["SharedBudget", "call_cost"]


def call_cost(keys: int) -> int:
    """Budget units of one fetch: the client's calls of <= 25 keys (30 keys cost 2)."""
    return max(1, math.ceil(keys / FETCH_BATCH_SIZE))


class SharedBudget:
    """The budget checks of one ``RedisSharedLayer`` (``budget=None``: no limit)."""

    def __init__(
        self,
        conn: RedisConnection,
        stats: RedisStats,
        *,
        budget: int | None,
        window: float,
        margin: float,
        min_processes: int = 1,
    ) -> None:
        self._conn = conn
        self.stats = stats
        self.budget = budget
        self.window = window
        self.margin = margin
        self.limiter: RedisRateLimiter | None = None
        self.share = (
            LocalShare(budget, window + margin, min_processes=min_processes)
            if budget is not None
            else None
        )
        self._paused_until = 0.0
        self._limited_until = 0.0

    def connect(self, client: Any, *, key: str, pause_key: str) -> None:
        self.limiter = RedisRateLimiter(
            client,
            key=key,
            pause_key=pause_key,
            budget=self.budget,
            window=self.window,
            margin=self.margin,
        )

    def reset(self) -> None:
        """Forget the client (after a fork: the child connects anew)."""
        self.limiter = None

    # -- checks --------------------------------------------------------------------------

    def check_local_hints(self) -> None:
        """What this process already learned from Redis, without asking it again."""
        now = time.monotonic()
        if now < self._paused_until:
            self.stats.paused += 1
            raise CircuitOpenError(
                f"fetching paused by a 429 for {self._paused_until - now:.1f}s more"
            )
        if now < self._limited_until:
            self.stats.rate_limited += 1
            raise self._error(self._limited_until - now)

    def paused_for(self, seconds: float) -> CircuitOpenError:
        """Another process published a pause: note it, and the error to raise."""
        self.stats.paused += 1
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        return CircuitOpenError(f"fetching paused by a 429 for {seconds:.1f}s more")

    def _error(self, retry_after: float) -> RateLimitedError:
        return RateLimitedError(
            f"workspace fetch budget ({self.budget} per {self.window:g}s, shared by all "
            f"processes) is spent; next call possible in {retry_after:.2f}s",
            status_code=None,
            retry_after=retry_after,
        )

    def take_local_share(self, cost: int) -> None:
        """During an outage: stay within this process's share of the budget."""
        if self.share is None:
            return
        wait = self.share.try_take(cost)
        if wait > 0:
            self.stats.rate_limited += 1
            raise self._error(wait)

    async def take(self, keys: int) -> None:
        """Take the units of a fetch of ``keys`` keys, or raise why it may not be made."""
        limiter, share = self.limiter, self.share
        if limiter is None or share is None:
            return
        cost = call_cost(keys)
        if share.recovering and (wait := share.fits(cost)) > 0:
            self.stats.rate_limited += 1  # others' outage calls may not be in the log yet
            raise self._error(wait)
        unsynced = share.unsynced()
        try:
            grant = await self._conn.run("rate-limit", lambda c: limiter.acquire(cost, unsynced))
        except Unavailable as exc:
            share.restore(unsynced)
            if exc.down:
                self.take_local_share(cost)
                return
            # A stall: calling unchecked could break the budget for everyone.
            self.stats.budget_unchecked += 1
            raise CircuitOpenError("Redis did not answer the budget check in time") from None
        if not grant.allowed:
            share.record(0, grant.processes, grant.used)
            self.stats.rate_limited += 1
            self._limited_until = time.monotonic() + grant.retry_after
            raise self._error(grant.retry_after)
        share.record(cost, grant.processes, grant.used)

    # -- calling -------------------------------------------------------------------------

    async def call(self, fetch: FetchFn) -> dict[str, CachedExperience]:
        """``fetch()``; a 429 it gets is published so every process pauses."""
        try:
            return await fetch()
        except RateLimitedError as exc:
            if exc.status_code == 429:
                await self._publish_pause(exc)
            raise

    async def _publish_pause(self, exc: RateLimitedError) -> None:
        seconds = DEFAULT_RETRY_POLICY.pause_for(exc) or 0.0
        if seconds <= 0:
            return
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        limiter = self.limiter
        if limiter is not None:
            with contextlib.suppress(Unavailable):
                await self._conn.run("pause", lambda c: limiter.pause(seconds))
