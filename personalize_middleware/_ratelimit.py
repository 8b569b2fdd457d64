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

A 429's ``Retry-After`` is published as a key with a PX expiry: every process checks it
before calling and stays quiet until it expires.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "PAUSE_SCRIPT",
    "RATE_LIMIT_SCRIPT",
    "RateLimitGrant",
    "RedisRateLimiter",
]

# KEYS[1] the grants log (sorted set); ARGV: budget, window (microseconds), cost, tag.
# Returns {allowed (0/1), retry_after_us, now_us}. Atomic: no other command runs between
# the count and the add, so concurrent callers cannot both take the last slot.
RATE_LIMIT_SCRIPT = """
local key = KEYS[1]
local budget = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local used = redis.call('ZCARD', key)
if used + cost > budget then
  local retry = window
  local idx = used + cost - budget - 1
  if idx >= 0 and idx < used then
    local oldest = redis.call('ZRANGE', key, idx, idx, 'WITHSCORES')
    retry = tonumber(oldest[2]) + window - now
  end
  return {0, retry, now}
end
for i = 1, cost do
  redis.call('ZADD', key, now, ARGV[4] .. ':' .. i)
end
redis.call('PEXPIRE', key, math.ceil(window / 1000) + 1000)
return {1, 0, now}
"""

# KEYS[1] the pause key; ARGV[1] milliseconds. Only ever lengthens a pause in force.
PAUSE_SCRIPT = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
end
return redis.call('PTTL', KEYS[1])
"""


@dataclass(frozen=True, slots=True)
class RateLimitGrant:
    """One answer of the limiter. ``server_time`` is the Redis clock, in seconds."""

    allowed: bool
    retry_after: float
    server_time: float


class RedisRateLimiter:
    """``budget`` calls per ``window`` seconds for everyone sharing ``key`` (``None``:
    no limit; the pause still works).

    Redis errors propagate: the caller decides how to degrade (``RedisSharedLayer`` calls
    through when Redis is unreachable; the API's own 429 is then the last line).
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
    ) -> None:
        if budget is not None and (
            not isinstance(budget, int) or isinstance(budget, bool) or budget < 1
        ):
            raise ValueError("budget must be a positive integer or None")
        if not window > 0:
            raise ValueError("window must be positive")
        self.key = key
        self.pause_key = pause_key
        self.budget = budget
        self.window = float(window)
        self.margin = self.window / 30 if margin is None else max(0.0, float(margin))
        self._window_us = round((self.window + self.margin) * 1_000_000)
        self._limit = client.register_script(RATE_LIMIT_SCRIPT)
        self._pause = client.register_script(PAUSE_SCRIPT)

    async def acquire(self, cost: int = 1) -> RateLimitGrant:
        """Take ``cost`` calls from the budget, or learn how long until they free up."""
        if self.budget is None:
            return RateLimitGrant(allowed=True, retry_after=0.0, server_time=time.time())
        cost = min(max(int(cost), 1), self.budget)
        tag = secrets.token_hex(6)
        reply: Any = await self._limit(
            keys=[self.key], args=[self.budget, self._window_us, cost, tag]
        )
        allowed, retry_us, now_us = (int(x) for x in reply)
        return RateLimitGrant(
            allowed=allowed == 1,
            retry_after=max(retry_us, 0) / 1_000_000,
            server_time=now_us / 1_000_000,
        )

    async def pause(self, seconds: float) -> float:
        """Pause every process for ``seconds`` (kept if a longer pause is in force).
        Returns the pause now in force, in seconds."""
        ms = max(1, math.ceil(seconds * 1000))
        remaining: Any = await self._pause(keys=[self.pause_key], args=[ms])
        return max(int(remaining), 0) / 1000
