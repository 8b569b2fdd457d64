"""Redis behind the in-process cache: a shared L2, cross-process single-flight, one budget.

``RedisSharedLayer`` implements the store's ``SharedLayer``. Key layout (``{ws}`` is the
workspace id in literal braces: a Redis Cluster hash tag, so a workspace's keys share one
slot and every Lua script touches a single slot)::

    pm:v1:{ws}:u:<identity digest>   hash    field "<context digest>:<experience key>" ->
                                             JSON {"t": fetched_at, "x": wire shape | null};
                                             expires after the store's retention;
                                             invalidate() is one DEL
    pm:v1:{ws}:l:<identity>:<context>:<keys digest>
                                     string  the fetch lease: the holder's token (PX, renewed
                                             while it fetches), then "done:ok" / "done:err"
                                             for a moment so latecomers read the outcome
    pm:v1:{ws}:rl                    zset    the rate limiter's grants (``_ratelimit.py``)
    pm:v1:{ws}:pause                 string  a 429's Retry-After, as a PX expiry

No raw identity is ever part of a key (digests only); values are JSON (never pickle),
bounded in size and validated when read back, so a foreign or corrupt value is a miss.

Every Redis call has a short timeout. When Redis fails the layer behaves as if it were
absent (``get`` finds nothing, ``set`` does nothing, ``coordinate`` calls straight
through) for a short backoff, logs one line per interval, then tries again by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from ._breaker import DEFAULT_MAX_RETRY_AFTER, CircuitOpenError
from ._client import FETCH_BATCH_SIZE
from ._config import PersonalizeSettings
from ._exceptions import APIError, ConfigurationError, RateLimitedError
from ._logging import RateLimitedLog
from ._models import Experience, Identity
from ._ratelimit import RedisRateLimiter
from ._store import (
    DEFAULT_CACHE_TTL,
    DEFAULT_STALE_IF_ERROR,
    DEFAULT_STALE_WHILE_REVALIDATE,
    CachedExperience,
    FetchFn,
    FetchQuery,
    identity_hash,
)

__all__ = [
    "DEFAULT_LEASE_TTL",
    "DEFAULT_MAX_VALUE_BYTES",
    "DEFAULT_OP_TIMEOUT",
    "DEFAULT_RATE_LIMIT_PER_MINUTE",
    "FORMAT_VERSION",
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
DEFAULT_OP_TIMEOUT = 0.1
#: Part of every key: a new value format gets new keys instead of misreading old ones.
FORMAT_VERSION = "v1"

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
_POLL_DELAYS = (0.005, 0.01, 0.02, 0.03, 0.05)  # then every 50 ms
_RETRY_BACKOFF_MIN, _RETRY_BACKOFF_MAX = 0.25, 2.0
_MAX_CLOCK_SKEW = 60.0  # a value "fetched" further in the future than this is foreign
_DEFAULT_429_PAUSE = 1.0
_PENDING_INVALIDATIONS = 10_000
_DONE, _FAILED, _RELEASE = "done:ok", "done:err", ""

_T = TypeVar("_T")

# KEYS: lease, pause, data. ARGV: token, lease ms, fields... One round trip tells a caller
# whether fetching is paused, hands it the lease, or tells it what the holder achieved.
_CLAIM_SCRIPT = """
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return {'paused', paused} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'acquired', 0} end
local state = redis.call('GET', KEYS[1])
if state == 'done:ok' then
  return {'done:ok', 0, redis.call('HMGET', KEYS[3], unpack(ARGV, 3))}
end
if state == 'done:err' then return {'done:err', 0} end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -1 then  -- not ours (no expiry): take it over rather than wait forever
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {'acquired', 0}
end
return {'held', ttl}
"""

# KEYS: lease. ARGV: token, outcome ('' deletes), outcome ms. Only the holder may release.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""

_RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: data hash. ARGV: retention ms, max fields, then (field, fetched_at, value)...
# Never replaces a newer entry with an older one; keeps the newest max-fields fields.
_SET_SCRIPT = """
local key = KEYS[1]
local kind = redis.call('TYPE', key)['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', key) end
local function stamp(v)
  if not v then return nil end
  return tonumber(string.match(v, '^{"t":(-?[%d%.eE+-]+)'))
end
local written = 0
for i = 3, #ARGV, 3 do
  local old = stamp(redis.call('HGET', key, ARGV[i]))
  if not (old and old > tonumber(ARGV[i + 1])) then
    redis.call('HSET', key, ARGV[i], ARGV[i + 2])
    written = written + 1
  end
end
local n = redis.call('HLEN', key)
local max_fields = tonumber(ARGV[2])
if n > max_fields then
  local all = redis.call('HGETALL', key)
  local items = {}
  for j = 1, #all, 2 do table.insert(items, {all[j], stamp(all[j + 1]) or 0}) end
  table.sort(items, function(a, b) return a[2] < b[2] end)
  for j = 1, n - max_fields do redis.call('HDEL', key, items[j][1]) end
end
if n > 0 then redis.call('PEXPIRE', key, ARGV[1]) end
return written
"""


@dataclass(slots=True)
class RedisStats:
    """Counters of the shared layer (``layer.stats``)."""

    l2_hits: int = 0
    l2_misses: int = 0
    l2_writes: int = 0
    l2_malformed: int = 0
    l2_oversize: int = 0
    l2_errors: int = 0
    lease_acquired: int = 0
    lease_waits: int = 0
    lease_served: int = 0
    lease_failed: int = 0
    lease_takeovers: int = 0
    lease_timeouts: int = 0
    rate_limited: int = 0
    paused: int = 0
    degraded: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Unavailable(Exception):
    """Redis cannot be used for this operation (down, slow, backing off, or refused)."""


class _StoredEntries(dict[str, CachedExperience]):
    """Entries already in L2 (``retention`` they were written with, ``None`` if another
    process wrote them): the store's ``set`` that follows ``coordinate`` then skips."""

    __slots__ = ("retention",)

    def __init__(self, entries: Mapping[str, CachedExperience], retention: float | None):
        super().__init__(entries)
        self.retention = retention


def _import_redis() -> Any:
    try:
        return importlib.import_module("redis.asyncio")
    except ImportError as exc:
        raise ConfigurationError(
            "redis_url is set but the 'redis' package is not installed: "
            "pip install 'personalize-middleware[redis]'",
            field="redis_url",
        ) from exc


def _mask_url(url: str) -> str:
    """The URL without its password or query string (which may carry one)."""
    masked = re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:****@", url)
    return masked.split("?", 1)[0]


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number", field=name)
    return float(value)


class RedisSharedLayer:
    """A Redis-backed ``SharedLayer``: shared cache, single-flight and rate budget.

    ``rate_limit_per_minute`` is the budget per ``rate_limit_window`` seconds (60 unless
    changed) for every process using this workspace; ``None`` turns the limiter off.
    ``lease_ttl`` bounds how long others wait for a holder that died; ``op_timeout``
    bounds every Redis call. Build it from settings with ``from_settings``.
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
        budget = rate_limit_per_minute
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
        ):
            raise ConfigurationError(
                "rate_limit_per_minute must be a positive integer or None",
                field="rate_limit_per_minute",
            )
        for name, number in (
            ("max_value_bytes", max_value_bytes),
            ("max_fields_per_identity", max_fields_per_identity),
        ):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ConfigurationError(f"{name} must be a positive integer", field=name)
        self._redis = _import_redis()  # fail at configuration time, not on a request
        self._url = url
        self.workspace_id = workspace_id
        self.prefix = f"{namespace}:{FORMAT_VERSION}:{{{workspace_id}}}:"
        self.rate_limit_per_minute = budget
        self.rate_limit_window = _positive("rate_limit_window", rate_limit_window)
        self.rate_limit_margin = rate_limit_margin
        self.lease_ttl = _positive("lease_ttl", lease_ttl)
        self.max_wait = _positive("max_wait", max_wait)
        self.max_value_bytes = max_value_bytes
        self.max_fields = max_fields_per_identity
        self.op_timeout = _positive("op_timeout", op_timeout)
        self._retention = (
            _positive("retention", retention)
            if retention is not None
            else DEFAULT_CACHE_TTL + max(DEFAULT_STALE_WHILE_REVALIDATE, DEFAULT_STALE_IF_ERROR)
        )
        self.stats = RedisStats()
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._limiter: RedisRateLimiter | None = None
        self._errors: tuple[type[BaseException], ...] = (
            self._redis.RedisError,
            OSError,
            TimeoutError,
        )
        self._refusals: tuple[type[BaseException], ...] = (self._redis.ResponseError,)
        self._failures = 0
        self._retry_at = 0.0
        self._paused_until = 0.0
        self._limited_until = 0.0
        self._pending_invalidations: deque[str] = deque(maxlen=_PENDING_INVALIDATIONS)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._log = RateLimitedLog(logger)

    @classmethod
    def from_settings(cls, settings: PersonalizeSettings, **options: Any) -> RedisSharedLayer:
        """The layer for ``settings.redis_url`` and ``settings.workspace_id``."""
        if not settings.redis_url:
            raise ConfigurationError("settings.redis_url is not set", field="redis_url")
        return cls(settings.redis_url, workspace_id=settings.workspace_id, **options)

    def __repr__(self) -> str:
        budget = self.rate_limit_per_minute
        return (
            f"RedisSharedLayer(url={_mask_url(self._url)!r}, "
            f"workspace_id={self.workspace_id!r}, "
            f"rate_limit={'off' if budget is None else f'{budget}/{self.rate_limit_window:g}s'}, "
            f"state={'degraded' if self._failures else 'ok'})"
        )

    @property
    def is_degraded(self) -> bool:
        """True while the last Redis call failed (the layer then acts as if absent)."""
        return self._failures > 0

    # -- keys and values -----------------------------------------------------------------

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

    def _encode(self, entry: CachedExperience) -> bytes | None:
        wire = entry.experience.to_api() if entry.experience is not None else None
        try:
            text = json.dumps(
                {"t": float(entry.fetched_at), "x": wire},
                separators=(",", ":"),
                ensure_ascii=False,
                allow_nan=False,
            )
        except (TypeError, ValueError):
            return None
        data = text.encode("utf-8")
        return data if len(data) <= self.max_value_bytes else None

    def _decode(self, key: str, raw: Any, now: float) -> CachedExperience | None:
        if not isinstance(raw, bytes | str) or len(raw) > self.max_value_bytes:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict) or "x" not in data:
            return None
        stamp, wire = data.get("t"), data["x"]
        if isinstance(stamp, bool) or not isinstance(stamp, int | float):
            return None
        if not math.isfinite(stamp) or stamp > now + _MAX_CLOCK_SKEW:
            return None
        fetched_at = min(float(stamp), now)
        if wire is None:
            return CachedExperience(None, fetched_at)
        if not isinstance(wire, dict):
            return None
        try:
            return CachedExperience(Experience.from_api(key, wire), fetched_at)
        except (ValueError, TypeError):
            return None

    def _decode_many(self, keys: list[str], values: Any) -> dict[str, CachedExperience]:
        found: dict[str, CachedExperience] = {}
        if not isinstance(values, list) or len(values) != len(keys):
            return found
        now = time.time()
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            entry = self._decode(key, raw, now)
            if entry is None:
                self.stats.l2_malformed += 1
            else:
                found[key] = entry
        self.stats.l2_hits += len(found)
        self.stats.l2_misses += len(keys) - len(found)
        return found

    # -- talking to Redis ----------------------------------------------------------------

    def _usable_client(self) -> Any:
        if self._closed or time.monotonic() < self._retry_at:
            raise _Unavailable
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        retry = importlib.import_module("redis.asyncio.retry")
        backoff = importlib.import_module("redis.backoff")
        client = self._redis.Redis.from_url(
            self._url,
            socket_connect_timeout=self.op_timeout,
            socket_timeout=self.op_timeout * 2,
            # No hidden retries: one timeout is the whole budget, then we degrade.
            retry=retry.Retry(backoff.NoBackoff(), 0),
        )
        self._scripts = {
            name: client.register_script(text)
            for name, text in (
                ("claim", _CLAIM_SCRIPT),
                ("release", _RELEASE_SCRIPT),
                ("renew", _RENEW_SCRIPT),
                ("set", _SET_SCRIPT),
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
        return client

    async def _run(self, what: str, op: Callable[[Any], Awaitable[_T]]) -> _T:
        """One Redis operation under the timeout; failures become ``_Unavailable``."""
        client = self._usable_client()
        try:
            async with asyncio.timeout(self.op_timeout):
                result = await op(client)
        except self._refusals as exc:
            # The server answered (a foreign value of the wrong type, OOM...): not an
            # outage, so no backoff; this one operation acts as a miss.
            self.stats.l2_errors += 1
            self._log.warning("refused-" + what, "personalize: Redis refused %s: %s", what, exc)
            raise _Unavailable from exc
        except self._errors as exc:
            self._failed(what, exc)
            raise _Unavailable from exc
        if self._failures:
            self._recovered()
        return result

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.l2_errors += 1
        now = time.monotonic()
        if now < self._retry_at:
            return  # a call already in flight when Redis went away: same outage
        self._failures += 1
        backoff = min(_RETRY_BACKOFF_MIN * 2 ** (self._failures - 1), _RETRY_BACKOFF_MAX)
        self._retry_at = now + backoff
        self._log.warning(
            "down",
            "personalize: Redis unavailable during %s (%s: %s); using the in-process cache "
            "only, retrying in %.2fs",
            what,
            type(exc).__name__,
            exc,
            backoff,
        )

    def _recovered(self) -> None:
        logger.info("personalize: Redis reachable again; shared cache resumed")
        self._failures = 0
        self._retry_at = 0.0
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
            await self._run("invalidate", lambda c: c.delete(*keys))
        except _Unavailable:
            self._pending_invalidations.extend(keys)

    # -- SharedLayer ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and check Redis once; a failure is logged and degrades, never raises."""
        with contextlib.suppress(_Unavailable):
            await self._run("start", lambda c: c.ping())

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*self._errors):
                await client.aclose()

    async def get(self, query: FetchQuery, keys: Collection[str]) -> dict[str, CachedExperience]:
        """Whatever L2 holds for these keys, at any age; ``{}`` when Redis is unusable."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        key = self.data_key(query.identity_hash)
        fields = [self._field(query, k) for k in wanted]
        try:
            values = await self._run("get", lambda c: c.hmget(key, fields))
        except _Unavailable:
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
            value = self._encode(entry)
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
            written = await self._run(
                "set", lambda c: self._scripts["set"](keys=[data_key], args=args)
            )
        except _Unavailable:
            return False
        self.stats.l2_writes += int(written)
        return True

    async def invalidate(self, identity: Identity) -> None:
        """Forget ``identity`` in L2 (every context). Retried on recovery if Redis is down."""
        key = self.data_key(identity_hash(identity))
        try:
            await self._run("invalidate", lambda c: c.delete(key))
        except _Unavailable:
            self._pending_invalidations.append(key)

    async def coordinate(
        self, query: FetchQuery, keys: Collection[str], fetch: FetchFn
    ) -> dict[str, CachedExperience]:
        """Fetch once for all processes, within the workspace budget; see the module doc."""
        wanted = list(dict.fromkeys(keys))
        self._check_local_hints()
        try:
            self._usable_client()
        except _Unavailable:
            self.stats.degraded += 1
            return await fetch()
        if not wanted:
            return await fetch()
        lease = self.lease_key(query, wanted)
        claim_keys = [lease, self.pause_key, self.data_key(query.identity_hash)]
        fields = [self._field(query, k) for k in wanted]
        token = secrets.token_hex(8)
        claim_args = [token, math.ceil(self.lease_ttl * 1000), *fields]
        deadline = time.monotonic() + self.max_wait
        polls = 0
        while True:
            try:
                reply = await self._run(
                    "claim", lambda c: self._scripts["claim"](keys=claim_keys, args=claim_args)
                )
            except _Unavailable:
                self.stats.degraded += 1
                return await fetch()
            state = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if state == "acquired":
                if polls:
                    self.stats.lease_takeovers += 1
                return await self._fetch_as_holder(query, wanted, fetch, lease, token)
            if state == "paused":
                self.stats.paused += 1
                seconds = int(reply[1]) / 1000
                self._paused_until = max(self._paused_until, time.monotonic() + seconds)
                raise CircuitOpenError(f"fetching paused by a 429 for {seconds:.1f}s more")
            if state == _DONE:
                found = self._decode_many(wanted, reply[2] if len(reply) > 2 else None)
                if len(found) == len(wanted):
                    self.stats.lease_served += 1
                    return _StoredEntries(found, None)
                # Gone since (invalidated, flushed, too big to share): fetch ourselves.
                return await self._fetch_unleased(wanted, fetch)
            if state == _FAILED:
                self.stats.lease_failed += 1
                raise CircuitOpenError("the same fetch just failed in another process")
            if polls == 0:
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

    async def _take_budget(self, keys: list[str]) -> None:
        limiter = self._limiter
        if limiter is None or self.rate_limit_per_minute is None:
            return
        cost = math.ceil(len(keys) / FETCH_BATCH_SIZE)  # the client's calls of <= 25 keys
        try:
            grant = await self._run("rate-limit", lambda c: limiter.acquire(cost))
        except _Unavailable:
            return  # Redis unusable: call through; the API's own 429 stays the backstop
        if not grant.allowed:
            self.stats.rate_limited += 1
            self._limited_until = time.monotonic() + grant.retry_after
            raise self._budget_error(grant.retry_after)

    async def _publish_pause(self, exc: RateLimitedError) -> None:
        seconds = exc.retry_after if exc.retry_after is not None else _DEFAULT_429_PAUSE
        seconds = min(max(seconds, 0.0), DEFAULT_MAX_RETRY_AFTER)
        if seconds <= 0 or self._limiter is None:
            return
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)
        limiter = self._limiter
        with contextlib.suppress(_Unavailable):
            await self._run("pause", lambda c: limiter.pause(seconds))

    async def _fetch_unleased(self, keys: list[str], fetch: FetchFn) -> dict[str, CachedExperience]:
        await self._take_budget(keys)
        try:
            return await fetch()
        except RateLimitedError as exc:
            if exc.status_code == 429:
                await self._publish_pause(exc)
            raise

    async def _fetch_as_holder(
        self, query: FetchQuery, keys: list[str], fetch: FetchFn, lease: str, token: str
    ) -> dict[str, CachedExperience]:
        self.stats.lease_acquired += 1
        renewer = self._spawn(self._renew(lease, token))
        outcome = _RELEASE  # no call made: let a waiter take the lease and try
        try:
            try:
                await self._take_budget(keys)
                entries = await fetch()
            except CircuitOpenError:
                raise
            except RateLimitedError as exc:
                outcome = _FAILED
                if exc.status_code == 429:
                    await self._publish_pause(exc)
                raise
            except APIError:
                outcome = _FAILED
                raise
            retention = self._retention
            if await self._write(query, entries, retention):
                outcome = _DONE
                return _StoredEntries(entries, retention)
            return entries
        finally:
            renewer.cancel()
            await self._release(lease, token, outcome)

    async def _release(self, lease: str, token: str, outcome: str) -> None:
        ms = math.ceil((self.lease_ttl if outcome == _DONE else min(self.lease_ttl, 1.0)) * 1000)
        with contextlib.suppress(_Unavailable):
            await self._run(
                "release",
                lambda c: self._scripts["release"](keys=[lease], args=[token, outcome, ms]),
            )

    async def _renew(self, lease: str, token: str) -> None:
        """Keep the lease while the fetch runs: it expires only if this process dies."""
        ms = math.ceil(self.lease_ttl * 1000)
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                kept = await self._run(
                    "renew", lambda c: self._scripts["renew"](keys=[lease], args=[token, ms])
                )
            except _Unavailable:
                continue
            if not kept:
                return
