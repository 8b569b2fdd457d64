"""One guarded connection to Redis: every call timed out, failures classified, recovery
automatic.

Redis failing is one of two things:

- a *stall*: timeouts for less than ``stall_tolerance``. The one operation fails
  (``Unavailable(down=False)``); the caller decides what is safe (a read is a miss, a
  lease is asked for again, an unchecked fetch is not made).
- an *outage*: connection refused or reset, or timeouts that last. Redis is then not
  asked at all for a short backoff (0.25 s, doubling to 2 s) and every call fails at once
  with ``Unavailable(down=True)``; the first call after the backoff tries again, and its
  success ends the outage (``on_recovered``).

A refusal by the server (``ResponseError``: a foreign value of the wrong type, OOM) is
neither: that one operation fails, with no backoff. One log line per kind per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ..._exceptions import ConfigurationError
from ..._logging import RateLimitedLog
from ._urls import build_client, parse_redis_url

__all__ = [
    "DEFAULT_OP_TIMEOUT",
    "DEFAULT_STALL_TOLERANCE",
    "RedisConnection",
    "RedisStats",
    "Unavailable",
    "import_redis",
    "mask_url",
]

logger = logging.getLogger("personalize_middleware.redis")

DEFAULT_OP_TIMEOUT = 0.1
#: Timeouts for less than this are a stall (skip the operation); longer, an outage.
DEFAULT_STALL_TOLERANCE = 1.0
_RETRY_BACKOFF_MIN, _RETRY_BACKOFF_MAX = 0.25, 2.0

_T = TypeVar("_T")


@dataclass(slots=True)
class RedisStats:
    """Counters of the shared layer (``layer.stats``)."""

    l2_hits: int = 0
    l2_misses: int = 0
    l2_writes: int = 0
    l2_malformed: int = 0
    l2_oversize: int = 0
    l2_errors: int = 0
    l2_stale_writes: int = 0
    lease_acquired: int = 0
    lease_waits: int = 0
    lease_served: int = 0
    lease_failed: int = 0
    lease_takeovers: int = 0
    lease_timeouts: int = 0
    rate_limited: int = 0
    budget_unchecked: int = 0
    paused: int = 0
    degraded: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Unavailable(Exception):
    """Redis cannot be used for this operation; ``down``: an outage, not a stall."""

    def __init__(self, down: bool) -> None:
        super().__init__("Redis unavailable")
        self.down = down


def import_redis() -> Any:
    """``redis.asyncio``, or a ``ConfigurationError`` saying what to install."""
    try:
        return importlib.import_module("redis.asyncio")
    except ImportError as exc:
        raise ConfigurationError(
            "redis_url is set but the 'redis' package is not installed: "
            "pip install 'personalize-middleware[redis]'",
            field="redis_url",
        ) from exc


def mask_url(url: str) -> str:
    """The URL without its password or query string (which may carry one)."""
    masked = re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:****@", url)
    return masked.split("?", 1)[0]


class RedisConnection:
    """A lazily created ``redis.asyncio`` client behind ``run()``.

    ``on_connect(client)`` runs when the client is created (register scripts there);
    ``on_recovered()`` when a call succeeds after an outage. ``meanwhile`` says in the log
    what the user of the connection does during an outage. ``url`` is any form
    ``_urls.py`` knows: one Redis, a Cluster, or a Sentinel-managed primary.
    """

    def __init__(
        self,
        url: str,
        *,
        stats: RedisStats,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        stall_tolerance: float = DEFAULT_STALL_TOLERANCE,
        on_connect: Callable[[Any], None] = lambda client: None,
        on_recovered: Callable[[], None] = lambda: None,
        meanwhile: str = "using the in-process cache only",
    ) -> None:
        self.target = parse_redis_url(url)  # a bad URL fails here, not on a request
        self._redis = import_redis()
        self.url = url
        self.stats = stats
        self.op_timeout = op_timeout
        self.stall_tolerance = stall_tolerance
        self._on_connect = on_connect
        self._on_recovered = on_recovered
        self._meanwhile = meanwhile
        self._client: Any = None
        self._errors: tuple[type[BaseException], ...] = (
            self._redis.RedisError,
            importlib.import_module("redis.exceptions").RedisClusterException,
            OSError,
            TimeoutError,
        )
        self._timeouts: tuple[type[BaseException], ...] = (self._redis.TimeoutError, TimeoutError)
        self._refusals: tuple[type[BaseException], ...] = (self._redis.ResponseError,)
        self._failures = 0  # outages in a row: the backoff grows with them
        self._retry_at = 0.0  # no Redis call before this (monotonic)
        self._failing_since: float | None = None  # first failure since the last success
        self._closed = False
        self._log = RateLimitedLog(logger)

    @property
    def is_degraded(self) -> bool:
        """True during an outage."""
        return self._failures > 0

    @property
    def retry_in(self) -> float:
        """Seconds until Redis is tried again after an outage (0: it is tried now)."""
        return max(0.0, self._retry_at - time.monotonic())

    def client(self) -> Any:
        """The client, or ``Unavailable(down=True)`` during an outage's backoff."""
        if self._closed or time.monotonic() < self._retry_at:
            raise Unavailable(down=True)
        if self._client is None:
            retry = importlib.import_module("redis.asyncio.retry")
            backoff = importlib.import_module("redis.backoff")
            self._client = build_client(
                self._redis,
                self.target,
                socket_connect_timeout=self.op_timeout,
                socket_timeout=self.op_timeout * 2,
                # No hidden retries: one timeout is the whole budget, then we degrade.
                retry=retry.Retry(backoff.NoBackoff(), 0),
            )
            self._on_connect(self._client)
        return self._client

    async def run(
        self, what: str, op: Callable[[Any], Awaitable[_T]], timeout: float | None = None
    ) -> _T:
        """``op(client)`` under the timeout (``op_timeout`` unless given); any failure
        becomes ``Unavailable``."""
        client = self.client()
        try:
            async with asyncio.timeout(timeout or self.op_timeout):
                result = await op(client)
        except self._refusals as exc:
            self.stats.l2_errors += 1
            self._log.warning("refused-" + what, "personalize: Redis refused %s: %s", what, exc)
            raise Unavailable(down=False) from exc
        except self._errors as exc:
            raise Unavailable(down=self._failed(what, exc)) from exc
        self._failing_since = None
        if self._failures:
            logger.info("personalize: Redis reachable again; shared cache resumed")
            self._failures = 0
            self._retry_at = 0.0
            self._on_recovered()
        return result

    def _failed(self, what: str, exc: BaseException) -> bool:
        """Count a failure; True when it is (part of) an outage, False for a stall."""
        self.stats.l2_errors += 1
        now = time.monotonic()
        if now < self._retry_at:
            return True  # a call already in flight when the outage began
        if self._failing_since is None:
            self._failing_since = now
        if isinstance(exc, self._timeouts) and now - self._failing_since < self.stall_tolerance:
            self._log.warning(
                "stall", "personalize: Redis did not answer %s in time; skipped", what
            )
            return False
        self._failures += 1
        backoff = min(_RETRY_BACKOFF_MIN * 2 ** (self._failures - 1), _RETRY_BACKOFF_MAX)
        self._retry_at = now + backoff
        self._log.warning(
            "down",
            "personalize: Redis unavailable during %s (%s: %s); %s, retrying in %.2fs",
            what,
            type(exc).__name__,
            exc,
            self._meanwhile,
            backoff,
        )
        return True

    def reset_after_fork(self) -> None:
        """In a forked child: drop the parent's client without touching its sockets (they
        are the parent's; closing them here could cut the parent off). The next call
        connects anew, from this process."""
        self._client = None
        self._failures = 0
        self._retry_at = 0.0
        self._failing_since = None

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            # A Sentinel-managed client also holds clients of the Sentinels themselves.
            manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
            for each in [client, *getattr(manager, "sentinels", ())]:
                with contextlib.suppress(*self._errors):
                    await each.aclose()
