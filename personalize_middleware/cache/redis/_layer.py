"""Redis behind the in-process cache: a shared L2, cross-process single-flight, one budget.

``RedisSharedLayer`` implements the store's ``SharedLayer``; what it keeps in Redis (keys,
values, Lua scripts) is described in ``_redis_codec.py``, the budget in ``_ratelimit.py``.

Redis failing never breaks a page (``_redis_conn.py`` tells a stall from an outage): in a
stall a read is a miss, the lease is asked for again, and a fetch whose budget could not
be checked is not made (stale or defaults render: calling unchecked could duplicate or
overspend); in an outage the layer acts as if absent (``get`` finds nothing, ``set`` does
nothing, ``coordinate`` calls through within this process's share of the budget) until
Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Collection, Coroutine, Mapping
from typing import Any

from ..._config import PersonalizeSettings, positive_int, positive_number
from ..._contract import FETCH_BATCH_SIZE
from ..._exceptions import APIError, CircuitOpenError, ConfigurationError, RateLimitedError
from ..._interfaces import FetchFn
from ..._logging import RateLimitedLog
from ..._models import CachedExperience, FetchQuery, Identity, identity_hash
from ..._retry import DEFAULT_RETRY_POLICY
from .._store import (
    DEFAULT_CACHE_TTL,
    DEFAULT_STALE_IF_ERROR,
    DEFAULT_STALE_WHILE_REVALIDATE,
)
from ._codec import (
    CLAIM_SCRIPT,
    DONE,
    FAILED,
    FORMAT_VERSION,
    RELEASE,
    RELEASE_SCRIPT,
    RENEW_SCRIPT,
    SET_SCRIPT,
    decode_entry,
    encode_entry,
)
from ._connection import (
    DEFAULT_OP_TIMEOUT,
    DEFAULT_STALL_TOLERANCE,
    RedisConnection,
    RedisStats,
    Unavailable,
    mask_url,
)
from ._limiter import LocalShare, RedisRateLimiter

__all__ = [
    "DEFAULT_LEASE_TTL",
    "DEFAULT_MAX_VALUE_BYTES",
    "DEFAULT_OP_TIMEOUT",
    "DEFAULT_RATE_LIMIT_PER_MINUTE",
    "DEFAULT_STALL_TOLERANCE",
    "RedisSharedLayer",
    "RedisStats",
]

logger = logging.getLogger("personalize_middleware.redis")

#: MoEngage allows 10,000 Fetch calls a minute per workspace; keep a safe margin below.
DEFAULT_RATE_LIMIT_PER_MINUTE = 9000
DEFAULT_LEASE_TTL = 3.0
DEFAULT_MAX_WAIT = 10.0
DEFAULT_MAX_VALUE_BYTES = 64 * 1024
DEFAULT_MAX_FIELDS_PER_IDENTITY = 256

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
_POLL_DELAYS = (0.005, 0.01, 0.02, 0.03, 0.05)  # then every 50 ms
_STALL_RETRIES = 3  # attempts at the writes other processes wait for
_PENDING_INVALIDATIONS = 10_000


class _StoredEntries(dict[str, CachedExperience]):
    """Entries already in L2 (``retention`` they were written with, ``None`` if another
    process wrote them): the store's ``set`` that follows ``coordinate`` then skips."""

    __slots__ = ("retention",)

    def __init__(self, entries: Mapping[str, CachedExperience], retention: float | None):
        super().__init__(entries)
        self.retention = retention


class RedisSharedLayer:
    """A Redis-backed ``SharedLayer``: shared cache, single-flight and rate budget.

    ``rate_limit_per_minute`` is the budget per ``rate_limit_window`` seconds (60 unless
    changed) for every process using this workspace; ``None`` turns the limiter off.
    ``rate_limit_margin`` (default window / 30) widens the counted window to absorb
    network jitter. ``lease_ttl`` bounds how long others wait for a holder that died,
    ``max_wait`` how long they wait for a live one. ``op_timeout`` bounds every Redis
    call; timeouts lasting less than ``stall_tolerance`` are a stall (the fetch is
    skipped rather than made without checking the budget), longer ones an outage. Build it
    from settings with ``from_settings``.
    """

    def __init__(
        self,
        url: str,
        *,
        workspace_id: str,
        namespace: str = "pm",
        rate_limit_per_minute: int | None = DEFAULT_RATE_LIMIT_PER_MINUTE,
        rate_limit_window: float = 60.0,
        rate_limit_margin: float | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        max_fields_per_identity: int = DEFAULT_MAX_FIELDS_PER_IDENTITY,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        stall_tolerance: float = DEFAULT_STALL_TOLERANCE,
        retention: float | None = None,
    ) -> None:
        if not isinstance(url, str) or not re.match(r"^(rediss?|unix)://", url):
            raise ConfigurationError(
                "redis_url must start with redis://, rediss:// or unix://", field="redis_url"
            )
        for name, value in (("workspace_id", workspace_id), ("namespace", namespace)):
            if not isinstance(value, str) or not _NAME_RE.match(value):
                raise ConfigurationError(
                    f"{name} must be 1-128 letters, digits, '_' or '-'", field=name
                )
        if rate_limit_per_minute is not None:
            positive_int("rate_limit_per_minute", rate_limit_per_minute)
        if rate_limit_margin is not None and (
            isinstance(rate_limit_margin, bool)
            or not isinstance(rate_limit_margin, int | float)
            or rate_limit_margin < 0
        ):
            raise ConfigurationError(
                "rate_limit_margin must be a number >= 0", field="rate_limit_margin"
            )
        self._url = url
        self.workspace_id = workspace_id
        self.prefix = f"{namespace}:{FORMAT_VERSION}:{{{workspace_id}}}:"
        self.rate_limit_per_minute = rate_limit_per_minute
        self.rate_limit_window = positive_number("rate_limit_window", rate_limit_window)
        self.rate_limit_margin = (
            self.rate_limit_window / 30 if rate_limit_margin is None else float(rate_limit_margin)
        )
        self.lease_ttl = positive_number("lease_ttl", lease_ttl)
        self.max_wait = positive_number("max_wait", max_wait)
        self.max_value_bytes = positive_int("max_value_bytes", max_value_bytes)
        self.max_fields = positive_int("max_fields_per_identity", max_fields_per_identity)
        self.op_timeout = positive_number("op_timeout", op_timeout)
        self.stall_tolerance = positive_number("stall_tolerance", stall_tolerance)
        self.stats = RedisStats()
        self._conn = RedisConnection(  # imports redis: fails here, not on a request
            url,
            stats=self.stats,
            op_timeout=self.op_timeout,
            stall_tolerance=self.stall_tolerance,
            on_connect=self._connected,
            on_recovered=self._recovered,
        )
        self._retention = (
            positive_number("retention", retention)
            if retention is not None
            else DEFAULT_CACHE_TTL + max(DEFAULT_STALE_WHILE_REVALIDATE, DEFAULT_STALE_IF_ERROR)
        )
        self._scripts: dict[str, Any] = {}
        self._limiter: RedisRateLimiter | None = None
        self._share = (
            LocalShare(rate_limit_per_minute, self.rate_limit_window + self.rate_limit_margin)
            if rate_limit_per_minute is not None
            else None
        )
        self._paused_until = 0.0
        self._limited_until = 0.0
        self._pending_invalidations: deque[str] = deque(maxlen=_PENDING_INVALIDATIONS)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = RateLimitedLog(logger)

    @classmethod
    def from_settings(cls, settings: PersonalizeSettings, **options: Any) -> RedisSharedLayer:
        """The layer for ``settings.redis_url`` and ``settings.workspace_id``."""
        if not settings.redis_url:
            raise ConfigurationError("settings.redis_url is not set", field="redis_url")
        return cls(settings.redis_url, workspace_id=settings.workspace_id, **options)

    def __repr__(self) -> str:
        budget = self.rate_limit_per_minute
        limit = "off" if budget is None else f"{budget}/{self.rate_limit_window:g}s"
        return (
            f"RedisSharedLayer(url={mask_url(self._url)!r}, "
            f"workspace_id={self.workspace_id!r}, rate_limit={limit}, "
            f"state={'degraded' if self.is_degraded else 'ok'})"
        )

    @property
    def is_degraded(self) -> bool:
        """True during an outage (the layer then acts as if absent)."""
        return self._conn.is_degraded

    @property
    def retry_in(self) -> float:
        """Seconds until Redis is tried again after an outage (0: it is tried now)."""
        return self._conn.retry_in

    # -- keys ----------------------------------------------------------------------------

    def data_key(self, identity_digest: str) -> str:
        return f"{self.prefix}u:{identity_digest}"

    def lease_key(self, query: FetchQuery, keys: Collection[str]) -> str:
        digest = hashlib.sha256("\x1f".join(sorted(keys)).encode("utf-8")).hexdigest()[:16]
        return f"{self.prefix}l:{query.identity_hash}:{query.context_hash}:{digest}"

    @property
    def rate_limit_key(self) -> str:
        return f"{self.prefix}rl"

    @property
    def pause_key(self) -> str:
        return f"{self.prefix}pause"

    @staticmethod
    def _field(query: FetchQuery, key: str) -> str:
        return f"{query.context_hash}:{key}"

    def _decode_many(self, keys: list[str], values: Any) -> dict[str, CachedExperience]:
        found: dict[str, CachedExperience] = {}
        if not isinstance(values, list) or len(values) != len(keys):
            return found
        now = time.time()
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            entry = decode_entry(key, raw, now, self.max_value_bytes)
            if entry is None:
                self.stats.l2_malformed += 1
            else:
                found[key] = entry
        self.stats.l2_hits += len(found)
        self.stats.l2_misses += len(keys) - len(found)
        return found

    # -- talking to Redis ----------------------------------------------------------------

    def _connected(self, client: Any) -> None:
        self._scripts = {
            name: client.register_script(text)
            for name, text in (
                ("claim", CLAIM_SCRIPT),
                ("release", RELEASE_SCRIPT),
                ("renew", RENEW_SCRIPT),
                ("set", SET_SCRIPT),
            )
        }
        self._limiter = RedisRateLimiter(
            client,
            key=self.rate_limit_key,
            pause_key=self.pause_key,
            budget=self.rate_limit_per_minute,
            window=self.rate_limit_window,
            margin=self.rate_limit_margin,
        )

    def _recovered(self) -> None:
        if self._pending_invalidations:
            self._spawn(self._flush_invalidations())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_invalidations(self) -> None:
        keys = list(self._pending_invalidations)
        self._pending_invalidations.clear()
        try:
            await self._conn.run("invalidate", lambda c: c.delete(*keys))
        except Unavailable:
            self._pending_invalidations.extend(keys)

    # -- SharedLayer ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and check Redis once; a failure is logged and degrades, never raises."""
        with contextlib.suppress(Unavailable):
            await self._conn.run("start", lambda c: c.ping())

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._conn.aclose()

    async def get(self, query: FetchQuery, keys: Collection[str]) -> dict[str, CachedExperience]:
        """Whatever L2 holds for these keys, at any age; ``{}`` when Redis is unusable."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        key = self.data_key(query.identity_hash)
        fields = [self._field(query, k) for k in wanted]
        try:
            values = await self._conn.run("get", lambda c: c.hmget(key, fields))
        except Unavailable:
            return {}
        return self._decode_many(wanted, values)

    async def set(
        self, query: FetchQuery, entries: Mapping[str, CachedExperience], retention: float
    ) -> None:
        """Share ``entries`` for ``retention`` seconds (a no-op when Redis is unusable)."""
        self._retention = float(retention)
        if isinstance(entries, _StoredEntries) and entries.retention in (None, retention):
            return  # coordinate() already shared exactly these
        await self._write(query, entries, retention)

    async def _write(
        self, query: FetchQuery, entries: Mapping[str, CachedExperience], retention: float
    ) -> bool:
        args: list[Any] = [max(1, math.ceil(retention * 1000)), self.max_fields]
        for key, entry in entries.items():
            value = encode_entry(entry, self.max_value_bytes)
            if value is None:
                self.stats.l2_oversize += 1
                self._log.warning(
                    "oversize",
                    "personalize: experience %r is over %d bytes as JSON; not shared in Redis",
                    key,
                    self.max_value_bytes,
                )
                continue
            args += [self._field(query, key), repr(float(entry.fetched_at)), value]
        if len(args) == 2:
            return True
        data_key = self.data_key(query.identity_hash)
        try:
            written = await self._conn.run(
                "set", lambda c: self._scripts["set"](keys=[data_key], args=args)
            )
        except Unavailable:
            return False
        self.stats.l2_writes += int(written)
        return True

    async def invalidate(self, identity: Identity) -> None:
        """Forget ``identity`` in L2 (every context). Replayed later if Redis is down."""
        key = self.data_key(identity_hash(identity))
        try:
            await self._conn.run("invalidate", lambda c: c.delete(key))
        except Unavailable:
            self._pending_invalidations.append(key)

    async def coordinate(
        self, query: FetchQuery, keys: Collection[str], fetch: FetchFn
    ) -> dict[str, CachedExperience]:
        """Run ``fetch`` once for all processes, within the workspace budget.

        Claims the lease for (identity, context, keys): the holder checks the budget,
        fetches, writes L2 and marks the lease done; others poll the lease and take the
        holder's results from L2, or its failure, or the lease when it expired."""
        wanted = list(dict.fromkeys(keys))
        self._check_local_hints()
        try:
            self._conn.client()
        except Unavailable:
            return await self._fetch_degraded(wanted, fetch)
        if not wanted:
            return await fetch()
        lease = self.lease_key(query, wanted)
        claim_keys = [lease, self.pause_key, self.data_key(query.identity_hash)]
        fields = [self._field(query, k) for k in wanted]
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
                return await self._fetch_as_holder(query, wanted, fetch, lease, token)
            if state == "paused":
                self.stats.paused += 1
                seconds = int(reply[1]) / 1000
                self._paused_until = max(self._paused_until, time.monotonic() + seconds)
                raise CircuitOpenError(f"fetching paused by a 429 for {seconds:.1f}s more")
            if state == DONE:
                found = self._decode_many(wanted, reply[2] if len(reply) > 2 else None)
                if len(found) == len(wanted):
                    self.stats.lease_served += 1
                    return _StoredEntries(found, None)
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

    # -- coordination helpers ------------------------------------------------------------

    def _check_local_hints(self) -> None:
        """What this process already learned from Redis, without asking it again."""
        now = time.monotonic()
        if now < self._paused_until:
            self.stats.paused += 1
            raise CircuitOpenError(
                f"fetching paused by a 429 for {self._paused_until - now:.1f}s more"
            )
        if now < self._limited_until:
            self.stats.rate_limited += 1
            raise self._budget_error(self._limited_until - now)

    def _budget_error(self, retry_after: float) -> RateLimitedError:
        return RateLimitedError(
            f"workspace fetch budget ({self.rate_limit_per_minute} per "
            f"{self.rate_limit_window:g}s, shared by all processes) is spent; "
            f"next call possible in {retry_after:.2f}s",
            status_code=None,
            retry_after=retry_after,
        )

    def _take_local_share(self, cost: int) -> None:
        """During an outage: stay within this process's share of the budget."""
        if self._share is None:
            return
        wait = self._share.try_take(cost)
        if wait > 0:
            self.stats.rate_limited += 1
            raise self._budget_error(wait)

    async def _take_budget(self, keys: list[str]) -> None:
        limiter = self._limiter
        if limiter is None or self._share is None:
            return
        cost = math.ceil(len(keys) / FETCH_BATCH_SIZE)  # the client's calls of <= 25 keys
        try:
            grant = await self._conn.run("rate-limit", lambda c: limiter.acquire(cost))
        except Unavailable as exc:
            if exc.down:
                self._take_local_share(cost)
                return
            # A stall: calling unchecked could break the budget for everyone.
            self.stats.budget_unchecked += 1
            raise CircuitOpenError("Redis did not answer the budget check in time") from None
        self._share.processes = grant.processes
        if not grant.allowed:
            self.stats.rate_limited += 1
            self._limited_until = time.monotonic() + grant.retry_after
            raise self._budget_error(grant.retry_after)
        self._share.record(cost)

    async def _call(self, fetch: FetchFn) -> dict[str, CachedExperience]:
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
        limiter = self._limiter
        if limiter is not None:
            with contextlib.suppress(Unavailable):
                await self._conn.run("pause", lambda c: limiter.pause(seconds))

    async def _fetch_degraded(self, keys: list[str], fetch: FetchFn) -> dict[str, CachedExperience]:
        self.stats.degraded += 1
        self._take_local_share(math.ceil(len(keys) / FETCH_BATCH_SIZE))
        return await self._call(fetch)

    async def _fetch_unleased(self, keys: list[str], fetch: FetchFn) -> dict[str, CachedExperience]:
        await self._take_budget(keys)
        return await self._call(fetch)

    async def _fetch_as_holder(
        self, query: FetchQuery, keys: list[str], fetch: FetchFn, lease: str, token: str
    ) -> dict[str, CachedExperience]:
        self.stats.lease_acquired += 1
        renewer = self._spawn(self._renew(lease, token))
        outcome = RELEASE  # no call made: let a waiter take the lease and try
        try:
            try:
                entries = await self._fetch_unleased(keys, fetch)
            except CircuitOpenError:
                raise
            except APIError:  # the upstream failed, or the budget is spent
                outcome = FAILED
                raise
            retention = self._retention
            for _ in range(_STALL_RETRIES):  # waiters depend on this write: insist a little
                if await self._write(query, entries, retention):
                    outcome = DONE
                    return _StoredEntries(entries, retention)
                if self.is_degraded:
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
