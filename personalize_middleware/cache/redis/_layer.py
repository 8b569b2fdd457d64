"""Redis behind the in-process cache: a shared L2, cross-process single-flight, one budget.

``RedisSharedLayer`` implements the store's ``SharedLayer``: keys ``_keys.py``, values
and scripts ``_codec.py``, lease ``_lease.py``, budget ``_budget.py`` / ``_limiter.py``,
generations ``_invalidation.py``, messages between processes ``_broadcast.py``. ``get``
reports the identity's generation and a write under an older one is refused: a fetch
begun before an invalidation never shares its answer after it, whichever process made it.

Redis failing never breaks a page (``_connection.py`` tells a stall from an outage): in a
stall a read is a miss, the lease is asked for again, and a fetch whose budget could not
be checked is not made (stale or defaults render: calling unchecked could duplicate or
overspend); in an outage the layer acts as if absent (``get`` finds nothing, ``set`` does
nothing, ``coordinate`` calls through within this process's share of the budget) until
Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Collection, Coroutine, Mapping
from typing import Any

from ..._config import PersonalizeSettings, positive_int, positive_number
from ..._exceptions import ConfigurationError
from ..._fork import abandon, register
from ..._interfaces import FetchFn, SharedEntries
from ..._logging import RateLimitedLog
from ..._models import CachedExperience, FetchQuery, Identity, identity_hash
from .._stats import (
    DEFAULT_CACHE_TTL,
    DEFAULT_STALE_IF_ERROR,
    DEFAULT_STALE_WHILE_REVALIDATE,
)
from ._broadcast import DEFAULT_POLL_INTERVAL, Broadcast, Listener
from ._budget import SharedBudget
from ._codec import (
    CLAIM_SCRIPT,
    FORMAT_VERSION,
    INVALIDATE_SCRIPT,
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
from ._invalidation import Invalidations
from ._keys import GENERATION_FIELD, KeyNames
from ._lease import FetchLeases, StoredEntries, Written

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

#: The generation of a read that failed: matches none, so nothing is written under it.
_UNKNOWN_GENERATION = "?"


class RedisSharedLayer:
    """A Redis-backed ``SharedLayer``: shared cache, single-flight and rate budget.

    ``url``: one Redis, a Cluster or a Sentinel primary (``_urls.py``).
    ``rate_limit_per_minute`` is the budget per ``rate_limit_window`` seconds
    (60 unless changed) for every process using this workspace; ``None`` turns the limiter
    off. ``rate_limit_margin`` (default window / 30) widens the counted window to absorb
    network jitter; ``min_processes`` is the fewest processes a process assumes when
    sharing the budget during an outage. ``lease_ttl`` bounds how long others wait for a
    holder that died, ``max_wait`` how long they wait for a live one. ``op_timeout`` bounds
    every Redis call; timeouts lasting less than ``stall_tolerance`` are a stall (the
    fetch is skipped rather than made without checking the budget), longer ones an outage.
    ``poll_interval`` bounds how late a process hears of a refresh it missed on pub/sub.
    Build it from settings with ``from_settings``."""

    def __init__(
        self,
        url: str,
        *,
        workspace_id: str,
        namespace: str = "pm",
        rate_limit_per_minute: int | None = DEFAULT_RATE_LIMIT_PER_MINUTE,
        rate_limit_window: float = 60.0,
        rate_limit_margin: float | None = None,
        min_processes: int = 1,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        max_fields_per_identity: int = DEFAULT_MAX_FIELDS_PER_IDENTITY,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        stall_tolerance: float = DEFAULT_STALL_TOLERANCE,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        retention: float | None = None,
    ) -> None:
        self.names = KeyNames(workspace_id, namespace, FORMAT_VERSION)
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
        self.prefix = self.names.prefix
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
        self._conn = RedisConnection(  # parses the URL, imports redis: fails here
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
        self.budget = SharedBudget(
            self._conn,
            self.stats,
            budget=rate_limit_per_minute,
            window=self.rate_limit_window,
            margin=self.rate_limit_margin,
            min_processes=positive_int("min_processes", min_processes),
        )
        self._leases = FetchLeases(
            conn=self._conn,
            names=self.names,
            scripts=self._scripts,
            stats=self.stats,
            budget=self.budget,
            lease_ttl=self.lease_ttl,
            max_wait=self.max_wait,
            decode=self._decode_many,
            write=self._write,
            retention=lambda: self._retention,
            spawn=self._spawn,
        )
        self.broadcast = Broadcast(
            self._conn, self.names, poll_interval=positive_number("poll_interval", poll_interval)
        )
        self._invalidations = Invalidations(
            self._conn, self.names, self._scripts, self.broadcast, lambda: self._retention
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = RateLimitedLog(logger)
        register(self)

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
        return self.names.data(identity_digest)

    def lease_key(self, query: FetchQuery, keys: Collection[str], generation: str = "") -> str:
        return self.names.lease(query, keys, generation)

    @property
    def rate_limit_key(self) -> str:
        return self.names.rate_limit

    @property
    def pause_key(self) -> str:
        return self.names.pause

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
        self._scripts.clear()
        self._scripts.update(
            (name, client.register_script(text))
            for name, text in (
                ("claim", CLAIM_SCRIPT),
                ("release", RELEASE_SCRIPT),
                ("renew", RENEW_SCRIPT),
                ("set", SET_SCRIPT),
                ("invalidate", INVALIDATE_SCRIPT),
            )
        )
        self.budget.connect(client, key=self.names.rate_limit, pause_key=self.names.pause)

    def _recovered(self) -> None:
        if self._invalidations.pending:
            self._spawn(self._invalidations.replay())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- SharedLayer ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check Redis, listen to the other processes; never raises."""
        # A Cluster client first learns every node's slots: more than one op's time.
        timeout = max(self.op_timeout, 1.0) if self._conn.target.kind == "cluster" else None
        with contextlib.suppress(Unavailable):
            await self._conn.run("start", lambda c: c.ping(), timeout)
        self.broadcast.start()

    async def aclose(self) -> None:
        await self.broadcast.aclose()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._conn.aclose()

    def reset_after_fork(self) -> None:
        """In a forked child: leave the parent's client and tasks be; connect anew."""
        abandon((self._conn._client, self._tasks))
        self._conn.reset_after_fork()
        self._scripts.clear()
        self.budget.reset()
        self.broadcast.reset_after_fork()
        self._tasks = set()

    async def get(self, query: FetchQuery, keys: Collection[str]) -> SharedEntries:
        """Whatever L2 holds for these keys, at any age, and the identity's generation
        (unknown, so that nothing is written under it, when Redis is unusable)."""
        wanted = list(dict.fromkeys(keys))
        key = self.names.data(query.identity_hash)
        fields = [self.names.field(query, k) for k in wanted]
        try:
            values = await self._conn.run(
                "get", lambda c: c.hmget(key, [*fields, GENERATION_FIELD])
            )
        except Unavailable:
            values = None
        if not isinstance(values, list) or not values:
            return SharedEntries({}, _UNKNOWN_GENERATION)
        raw = values.pop()
        generation = raw.decode("ascii", "replace") if isinstance(raw, bytes) else (raw or "")
        return SharedEntries(self._decode_many(wanted, values), str(generation))

    async def set(
        self,
        query: FetchQuery,
        entries: Mapping[str, CachedExperience],
        retention: float,
        *,
        generation: str | None = None,
    ) -> None:
        """Share ``entries`` for ``retention`` seconds if the identity is still at
        ``generation`` (``None``: whatever it is); a no-op when Redis is unusable."""
        self._retention = float(retention)
        if isinstance(entries, StoredEntries) and entries.retention in (None, retention):
            return  # coordinate() already shared exactly these
        if await self._write(query, entries, retention, generation) is Written.STALE:
            self.stats.l2_stale_writes += 1

    async def _write(
        self,
        query: FetchQuery,
        entries: Mapping[str, CachedExperience],
        retention: float,
        generation: str | None,
    ) -> Written:
        args: list[Any] = [
            max(1, math.ceil(retention * 1000)),
            self.max_fields,
            "*" if generation is None else generation,
        ]
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
            args += [self.names.field(query, key), repr(float(entry.fetched_at)), value]
        if len(args) == 3:
            return Written.OK
        data_key = self.names.data(query.identity_hash)
        try:
            written = await self._conn.run(
                "set", lambda c: self._scripts["set"](keys=[data_key], args=args)
            )
        except Unavailable:
            return Written.DOWN
        if int(written) < 0:
            return Written.STALE
        self.stats.l2_writes += int(written)
        return Written.OK

    async def invalidate(self, identity: Identity) -> None:
        """Forget ``identity`` in L2 (every context) and start its next generation, so no
        fetch begun before writes after; the other processes drop their L1 copies.
        Replayed when Redis answers again if it is down."""
        await self._invalidations.invalidate(identity_hash(identity))

    async def coordinate(
        self,
        query: FetchQuery,
        keys: Collection[str],
        fetch: FetchFn,
        *,
        generation: str | None = None,
    ) -> dict[str, CachedExperience]:
        """Run ``fetch`` once for all processes, within the workspace budget (``_lease.py``)."""
        return await self._leases.coordinate(query, keys, fetch, generation)

    # -- between processes ---------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(message)`` for each message another process broadcasts."""
        self.broadcast.add_listener(listener)

    async def publish_refresh(self, keys: list[str] | None = None, *, strict: bool = False) -> int:
        """Tell every process to refresh its experience metadata (and forget ``keys``)."""
        return await self.broadcast.publish_refresh(keys, strict=strict)
