"""A workspace-wide rate limit and a shared pause, kept in Redis.

MoEngage allows 10,000 Fetch calls per minute per workspace, for every process and machine
together. ``RedisRateLimiter`` keeps all of them under one budget with a sliding-window
log: a sorted set whose members are the grants of the last window, scored by the Redis
server's clock (``TIME``), so the limit holds in ANY rolling window (no fixed-window
double burst at the boundary) and no process's clock matters.

The limiter counts over ``window + margin``: a call granted at Redis time T reaches the
API a little later (network, queueing), so arrivals at the far end are spread by that
jitter; the margin absorbs it so the API never sees more than the budget in its own
rolling window.

The same script notes which processes asked lately; while Redis is unreachable each
process limits itself to its share of the budget (``LocalShare``), counting its own calls.

A 429's ``Retry-After`` is published as a key with a PX expiry: every process checks it
before calling and stays quiet until it expires.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..._exceptions import ConfigurationError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "PAUSE_SCRIPT",
    "RATE_LIMIT_SCRIPT",
    "LocalShare",
    "RateLimitGrant",
    "RedisRateLimiter",
]

# KEYS: the grants log (zset), the processes seen (zset). ARGV: budget, window (us), cost,
# grant tag, process id, then the ages (us) of calls this process made while Redis was
# out of reach (added to the log first, so they count against everyone's budget).
# Returns {allowed 0/1, retry_after_us, now_us, processes, grants in the window}.
# Atomic: no other command runs between the count and the add, so two callers can never
# both take the last slot.
RATE_LIMIT_SCRIPT = """
local budget = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = math.ceil(window / 1000) + 1000
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
redis.call('PEXPIRE', KEYS[2], ttl)
local processes = redis.call('ZCARD', KEYS[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
for i = 6, #ARGV do
  local at = now - tonumber(ARGV[i])
  if at > now - window then redis.call('ZADD', KEYS[1], at, ARGV[4] .. ':o' .. i) end
end
local used = redis.call('ZCARD', KEYS[1])
if used + cost > budget then
  local retry = window
  local idx = used + cost - budget - 1
  if idx >= 0 and idx < used then
    local oldest = redis.call('ZRANGE', KEYS[1], idx, idx, 'WITHSCORES')
    retry = tonumber(oldest[2]) + window - now
  end
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {0, retry, now, processes, used}
end
for i = 1, cost do
  redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. i)
end
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, 0, now, processes, used + cost}
"""

# KEYS: the pause key. ARGV: milliseconds. Only ever lengthens a pause in force.
PAUSE_SCRIPT = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
end
return redis.call('PTTL', KEYS[1])
"""


@dataclass(frozen=True, slots=True)
class RateLimitGrant:
    """One answer of the limiter. ``server_time`` is the Redis clock, in seconds;
    ``processes`` how many processes asked within the window (this one included);
    ``used`` the grants now in the window, every process's (this one's included)."""

    allowed: bool
    retry_after: float
    server_time: float
    processes: int = 1
    used: int = 0


class RedisRateLimiter:
    """``budget`` calls per ``window`` seconds for everyone sharing ``key`` (``None``:
    no limit; the pause still works).

    Redis errors propagate: the caller decides how to degrade.
    """

    def __init__(
        self,
        client: Redis,
        *,
        key: str,
        pause_key: str,
        budget: int | None,
        window: float = 60.0,
        margin: float | None = None,
        processes_key: str | None = None,
    ) -> None:
        if budget is not None and (
            not isinstance(budget, int) or isinstance(budget, bool) or budget < 1
        ):
            raise ConfigurationError("budget must be a positive integer or None", field="budget")
        if not window > 0:
            raise ConfigurationError("window must be positive", field="window")
        self.key = key
        self.pause_key = pause_key
        self.processes_key = processes_key or key + ":procs"
        self.budget = budget
        self.window = float(window)
        self.margin = self.window / 30 if margin is None else max(0.0, float(margin))
        self._window_us = round((self.window + self.margin) * 1_000_000)
        self._process_id = secrets.token_hex(8)
        self._limit = client.register_script(RATE_LIMIT_SCRIPT)
        self._pause = client.register_script(PAUSE_SCRIPT)

    async def acquire(self, cost: int = 1, unsynced: Sequence[float] = ()) -> RateLimitGrant:
        """Take ``cost`` calls from the budget, or learn how long until they free up.
        ``unsynced``: ages (seconds) of calls made while Redis could not be asked, added
        to the shared log first."""
        if self.budget is None:
            return RateLimitGrant(allowed=True, retry_after=0.0, server_time=time.time())
        cost = min(max(int(cost), 1), self.budget)
        args: list[int | str] = [
            self.budget,
            self._window_us,
            cost,
            secrets.token_hex(6),
            self._process_id,
            *(max(0, round(age * 1_000_000)) for age in unsynced[-self.budget :]),
        ]
        reply: Any = await self._limit(keys=[self.key, self.processes_key], args=args)
        allowed, retry_us, now_us, processes, used = (int(x) for x in reply)
        return RateLimitGrant(
            allowed=allowed == 1,
            retry_after=max(retry_us, 0) / 1_000_000,
            server_time=now_us / 1_000_000,
            processes=max(processes, 1),
            used=used,
        )

    async def pause(self, seconds: float) -> float:
        """Pause every process for ``seconds`` (kept if a longer pause is in force).
        Returns the pause now in force, in seconds."""
        ms = max(1, math.ceil(seconds * 1000))
        remaining: Any = await self._pause(keys=[self.pause_key], args=[ms])
        return max(int(remaining), 0) / 1000


class LocalShare:
    """What this process may call while Redis cannot be asked: its share of the budget
    (``budget // processes``, ``processes`` as Redis last counted them, at least
    ``min_processes``) in any rolling ``window``, counting

    - its own calls of the window (granted by Redis or made during the outage), and
    - its part (``1 / processes``) of the other processes' grants that Redis reported in
      the window at this process's last grant, until they leave the window.

    Summed over the processes that is at most the budget (see docs/deployment-redis.md).
    Calls made during the outage are kept (``unsynced``) and added to the shared log when
    Redis answers again; for one window after that (``recovering``) a call must also fit
    the share, since the other processes' outage calls reach the log only with their own
    first call after the outage.
    """

    __slots__ = (
        "_calls",
        "_others",
        "_others_at",
        "_recovering_until",
        "_unsynced",
        "budget",
        "min_processes",
        "processes",
        "window",
    )

    def __init__(self, budget: int, window: float, *, min_processes: int = 1) -> None:
        self.budget = budget
        self.window = window
        self.min_processes = max(1, min_processes)
        self.processes = 1
        self._calls: deque[float] = deque()
        self._others = 0
        self._others_at = 0.0
        self._recovering_until = 0.0
        self._unsynced: deque[float] = deque(maxlen=budget)

    @property
    def share(self) -> int:
        return max(1, self.budget // max(self.min_processes, self.processes))

    @property
    def recovering(self) -> bool:
        """Calls of an outage not yet in the shared log, or within one window since."""
        return bool(self._unsynced) or time.monotonic() < self._recovering_until

    def _trim(self, now: float) -> None:
        calls = self._calls
        while calls and calls[0] <= now - self.window:
            calls.popleft()

    def record(self, cost: int, processes: int = 1, used: int = 0) -> None:
        """A grant from Redis: ``processes`` and ``used`` as the limiter reported them."""
        now = time.monotonic()
        self._trim(now)
        self._calls.extend([now] * cost)
        while len(self._calls) > self.budget:  # bounded: older ones no longer matter
            self._calls.popleft()
        # Redis restarted empty counts few processes until all have asked again.
        recovering = now < self._recovering_until
        self.processes = max(self.processes, processes) if recovering else max(1, processes)
        self._others = max(0, used - len(self._calls))
        self._others_at = now

    def unsynced(self) -> list[float]:
        """Ages of the outage's calls not yet in the shared log (then forgotten)."""
        now = time.monotonic()
        ages = [now - t for t in self._unsynced if t > now - self.window]
        if self._unsynced:
            self._recovering_until = now + self.window
        self._unsynced.clear()
        return ages

    def restore(self, ages: Sequence[float]) -> None:
        """The shared log did not get ``ages`` after all (Redis failed again)."""
        now = time.monotonic()
        self._unsynced.extendleft(reversed([now - age for age in ages]))

    def fits(self, cost: int) -> float:
        """0 when ``cost`` more calls fit the share now, else seconds until they may."""
        now = time.monotonic()
        self._trim(now)
        used = len(self._calls)
        others_live = self._others and now - self._others_at < self.window
        if others_live:
            used += -(-self._others // max(self.min_processes, self.processes))
        over = used + cost - self.share
        if over <= 0:
            return 0.0
        if others_live:
            return self._others_at + self.window - now
        if over > len(self._calls):
            return self.window
        return self._calls[over - 1] + self.window - now

    def try_take(self, cost: int) -> float:
        """Take ``cost`` from the share and return 0, or return seconds until it fits."""
        wait = self.fits(cost)
        if wait == 0:
            now = time.monotonic()
            self._calls.extend([now] * cost)
            self._unsynced.extend([now] * cost)
        return wait
