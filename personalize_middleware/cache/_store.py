"""The per-user experience store.

``ExperienceStore`` keeps what MoEngage answered, per identity and per request context
(every forwarded attribute that can change the answer), in a bounded in-process
``cachetools.TTLCache`` (L1). An optional ``SharedLayer`` (Redis, see ``_redis.py``) sits
behind it as L2 and coordinates processes. Entries are

    fresh                   age < ttl                          served
    stale-while-revalidate  age < ttl + stale_while_revalidate served, ONE refresh runs
    stale-if-error          age < ttl + stale_if_error         served only if a fetch fails

Keys with no match are cached as ``None``. Concurrent misses for the same
(identity, context, key) share one upstream call: each in-flight key has one future,
resolved (never failed) with the experience, ``None`` or the stale fallback, and
carrying the ``Decision`` behind it (``_decisions.DecidedFuture``: network, shared,
stale with the failure's reason, ...); ``lookup`` reports its hits the same way.

Longer than ~400 lines because reading, fetching, falling back and interning share one
L1 structure and its invariants (ages, retention, single-flight): they read best together
(and report to the telemetry from each). A new fetch is started only within
``max_concurrent_fetches`` and the client's limits (``_fairness``).

A late answer cannot undo an invalidation: the identity's fetches in flight write nothing
to L1 afterwards (``_flights.py``), nor to L2, where the fetch carries the generation it
began under and the layer writes only under it. ``forget(keys)`` makes every entry of
those keys fetched before now a miss (a campaign paused or changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cachetools import TTLCache

from .._decisions import (
    NETWORK,
    RATE_LIMITED,
    REVALIDATING,
    SHARED,
    SHED,
    STALE,
    DecidedFuture,
    Decision,
    decision_from_entry,
    reason_for_error,
    settle,
)
from .._exceptions import APIError, CircuitOpenError, PersonalizeError
from .._fork import abandon, register
from .._interfaces import Broadcaster, PersonalizeBackend, SharedLayer, Telemetry
from .._logging import RateLimitedLog
from .._models import CachedExperience, Experience, FetchQuery, Identity, identity_hash
from ..upstream import CircuitBreaker
from ._fairness import ClientKey, ClientLimiter
from ._flights import Flight, Flights
from ._intern import Interner
from ._stats import (
    DEFAULT_CACHE_MAXSIZE,
    DEFAULT_CACHE_TTL,
    DEFAULT_MAX_CONCURRENT_FETCHES,
    DEFAULT_MAX_CONTEXTS_PER_IDENTITY,
    DEFAULT_STALE_IF_ERROR,
    DEFAULT_STALE_WHILE_REVALIDATE,
    StoreStats,
)

__all__ = ["ExperienceStore"]

logger = logging.getLogger("personalize_middleware.store")

_Contexts = dict[tuple[tuple[str, str], ...], dict[str, CachedExperience]]


class ExperienceStore:
    """Cache, coalesce and fetch experiences; never raises on the request path."""

    def __init__(
        self,
        backend: PersonalizeBackend,
        *,
        ttl: float = DEFAULT_CACHE_TTL,
        stale_while_revalidate: float = DEFAULT_STALE_WHILE_REVALIDATE,
        stale_if_error: float = DEFAULT_STALE_IF_ERROR,
        maxsize: int = DEFAULT_CACHE_MAXSIZE,
        max_contexts_per_identity: int = DEFAULT_MAX_CONTEXTS_PER_IDENTITY,
        max_concurrent_fetches: int = DEFAULT_MAX_CONCURRENT_FETCHES,
        shared: SharedLayer | None = None,
        breaker: CircuitBreaker | None = None,
        limiter: ClientLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.ttl = float(ttl)
        self.swr_until = self.ttl + float(stale_while_revalidate)
        self.sie_until = self.ttl + float(stale_if_error)
        self.retention = max(self.swr_until, self.sie_until)
        self.max_contexts = max_contexts_per_identity
        self.max_concurrent_fetches = max_concurrent_fetches
        self._interner = Interner()
        self.shared = shared
        self.breaker = breaker or CircuitBreaker()
        self.limiter = limiter
        self.clock = clock
        self.stats = StoreStats()
        #: Set by ``PersonalizeMiddleware(telemetry=...)``; ``None``: nothing reported.
        self.telemetry: Telemetry | None = None
        # By digest if other processes broadcast invalidations (naming only that), else by key.
        self._by_digest = isinstance(shared, Broadcaster)
        self._l1: TTLCache[str, _Contexts] = TTLCache(maxsize=maxsize, ttl=self.retention)
        self._flights = Flights()
        self._forgotten: dict[str, float] = {}  # key -> entries fetched before are misses
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = RateLimitedLog(logger)
        # What a fresh fetch's decisions name as their source (the local engine: "local").
        self._fetch_source: str = getattr(backend, "decision_source", NETWORK)
        if isinstance(shared, Broadcaster):
            shared.add_listener(self._on_broadcast)
        register(self)

    # -- reading -------------------------------------------------------------------------

    def lookup(
        self,
        query: FetchQuery,
        keys: Iterable[str],
        decisions: dict[str, Decision | CachedExperience] | None = None,
        client: ClientKey | None = None,
    ) -> tuple[dict[str, Experience | None], list[str]]:
        """What L1 can answer now (fresh, or stale with a refresh started) and the keys
        that need a fetch. Synchronous: the cache-hit path never yields.

        ``decisions`` (optional) gets, per answered key, the ``Decision`` (stale hits) or
        the fresh entry itself, made a ``Decision`` only when someone asks
        (``Personalization.why``): the hit path allocates nothing for it."""
        found: dict[str, Experience | None] = {}
        missing: list[str] = []
        refresh: list[str] = []
        try:
            # Indexing rather than TTLCache.get, which checks the entry twice (4x slower).
            ident = query.identity_hash if self._by_digest else query.identity_key
            entries = self._l1[ident].get(query.context_key)
        except KeyError:
            entries = None
        now = self.clock()
        forgotten = self._forgotten
        for key in keys:
            entry = entries.get(key) if entries is not None else None
            if entry is None or (forgotten and entry.fetched_at < forgotten.get(key, -1.0)):
                missing.append(key)
                continue
            age = now - entry.fetched_at
            if age < self.ttl:
                found[key] = entry.experience
                if decisions is not None:
                    decisions[key] = entry
            elif age < self.swr_until:
                found[key] = entry.experience
                refresh.append(key)
                if decisions is not None:
                    decisions[key] = decision_from_entry(entry, STALE, REVALIDATING, now)
            else:
                missing.append(key)
        stats = self.stats
        stats.hits += len(found) - len(refresh)
        stats.stale_hits += len(refresh)
        stats.misses += len(missing)
        if (telemetry := self.telemetry) is not None:
            telemetry.cache_result("hit", len(found) - len(refresh))
            telemetry.cache_result("stale", len(refresh))
            telemetry.cache_result("miss", len(missing))
        if refresh:
            self.start_fetch(query, refresh, client)
        return found, missing

    def start_fetch(
        self, query: FetchQuery, keys: Iterable[str], client: ClientKey | None = None
    ) -> dict[str, asyncio.Future[Experience | None]]:
        """Futures for ``keys``: joined to a fetch in flight, or one new fetch for the rest
        (if ``client``, the requesting address, and the identity are within their limits).

        The fetch runs as its own task: a waiter giving up does not cancel it, and its
        late answer still fills the cache."""
        futures: dict[str, asyncio.Future[Experience | None]] = {}
        to_fetch: list[str] = []
        ident = query.identity_key
        for key in keys:
            if key in futures:
                continue
            future = self._flights.future(query, key)
            if future is None:
                to_fetch.append(key)
            else:
                self.stats.coalesced += 1
                if self.telemetry is not None:
                    self.telemetry.cache_result("coalesced", 1)
                futures[key] = future
        if to_fetch and len(self._tasks) >= self.max_concurrent_fetches:
            futures.update(self._shed(query, to_fetch))
        elif to_fetch and self.limiter is not None and not self.limiter.allow(client, ident):
            futures.update(self._shed(query, to_fetch, limited=True))
        elif to_fetch:
            loop = asyncio.get_running_loop()
            mine: dict[str, asyncio.Future[Experience | None]] = {
                key: DecidedFuture(loop=loop) for key in to_fetch
            }
            futures.update(mine)
            flight = Flight(query, mine)
            self._flights.add(flight)
            task = loop.create_task(self._run_fetch(flight))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return futures

    def _shed(
        self, query: FetchQuery, keys: list[str], *, limited: bool = False
    ) -> dict[str, asyncio.Future[Experience | None]]:
        """Too many fetches in flight (a slow upstream), or this client is over its limits:
        answer from stale-if-error or with the defaults at once, without a call and without
        caching anything."""
        if self.telemetry is not None:
            self.telemetry.cache_result("shed", len(keys))
        if limited:
            self.stats.client_limited += len(keys)
            self._log.warning(
                "client-limited",
                "personalize: a client is over its cache-miss fetch limits (client_limits; "
                "if every visitor looks like one address, set trusted_proxies); "
                "serving stale or defaults",
            )
        else:
            self.stats.shed += len(keys)
            self._log.warning(
                "shed",
                "personalize: %d upstream fetches in flight; serving stale or defaults",
                len(self._tasks),
            )
        stale = self._stale_entries(query, keys)
        loop = asyncio.get_running_loop()
        now = self.clock()
        futures: dict[str, asyncio.Future[Experience | None]] = {}
        for key in keys:
            future = futures[key] = DecidedFuture(loop=loop)
            reason = RATE_LIMITED if limited else SHED
            settle(future, stale.get(key), source=STALE, reason=reason, now=now)
        return futures

    async def get(
        self,
        query: FetchQuery,
        keys: Iterable[str],
        *,
        timeout: float | None = None,
        client: ClientKey | None = None,
    ) -> dict[str, Experience]:
        """Experiences for ``keys`` (matched ones only), waiting at most ``timeout``."""
        found, missing = self.lookup(query, keys, client=client)
        if missing:
            futures = self.start_fetch(query, missing, client)
            done, _ = await asyncio.wait(futures.values(), timeout=timeout)
            for key, future in futures.items():
                if future in done:
                    found[key] = future.result()
        return {key: exp for key, exp in found.items() if exp is not None}

    # -- fetching ------------------------------------------------------------------------

    async def _run_fetch(self, flight: Flight) -> None:
        query, futures = flight.query, flight.futures
        keys = list(futures)
        entries: dict[str, CachedExperience] = {}
        served_by_l2: set[str] = set()
        reason: str | None = None
        started = time.perf_counter()
        try:
            entries = await self._load(flight, keys, served_by_l2)
        except (PersonalizeError, Exception) as exc:  # never let a fetch error escape
            entries = self._fallback(query, keys, exc)
            reason = reason_for_error(exc)
        finally:
            # Also on cancellation (shutdown): waiters get the defaults, never hang.
            fetch_ms = (time.perf_counter() - started) * 1000
            now = self.clock()
            self._flights.finish(flight)
            for key, future in futures.items():
                from_l2 = key in served_by_l2
                source = STALE if reason else SHARED if from_l2 else self._fetch_source
                settle(
                    future,
                    entries.get(key),
                    source=source,
                    reason=reason,
                    now=now,
                    fetch_ms=fetch_ms,
                )

    async def _load(
        self, flight: Flight, keys: list[str], served_by_l2: set[str] | None = None
    ) -> dict[str, CachedExperience]:
        query = flight.query
        result: dict[str, CachedExperience] = {}
        remaining = keys
        shared = self.shared
        since: dict[str, str] = {}  # the L2 generation the fetch began under, if any
        if shared is not None:
            from_l2 = self._unforgotten(await shared.get(query, keys))
            if (generation := getattr(from_l2, "generation", None)) is not None:
                since["generation"] = generation
            now = self.clock()
            if from_l2 and not flight.invalidated:
                self._remember(query, from_l2)  # stale ones still serve as fallback
            result = {k: e for k, e in from_l2.items() if now - e.fetched_at < self.ttl}
            if served_by_l2 is not None:
                served_by_l2.update(result)
            if self.telemetry is not None:
                self.telemetry.cache_result("shared", len(result))
            remaining = [k for k in keys if k not in result]
            if not remaining:
                return result
        fetched = await self._call_upstream(query, remaining, since)
        if not flight.invalidated:
            self._remember(query, fetched)
        result.update(fetched)
        if shared is not None:
            await shared.set(query, fetched, self.retention, **since)
        return result

    def _unforgotten(self, entries: dict[str, CachedExperience]) -> dict[str, CachedExperience]:
        """``entries`` less those of forgotten keys fetched before they were forgotten."""
        forgotten = self._forgotten
        for key in [k for k, e in entries.items() if e.fetched_at < forgotten.get(k, -1.0)]:
            del entries[key]
        return entries

    async def _call_upstream(
        self, query: FetchQuery, keys: list[str], since: Mapping[str, str]
    ) -> dict[str, CachedExperience]:
        async def fetch() -> dict[str, CachedExperience]:
            self.breaker.before_call()
            self.stats.upstream_calls += 1
            identity = query.identity
            try:
                answer = await self.backend.fetch_experiences(
                    keys,
                    customer_id=identity.api_customer_id,
                    user_identifiers=identity.user_identifiers,
                    attributes=query.attributes,
                )
            except APIError as exc:
                self.breaker.record_failure(exc)
                raise
            self.breaker.record_success()
            now = self.clock()
            return {key: CachedExperience(answer.get(key), now) for key in keys}

        if self.shared is None:
            return await fetch()
        return await self.shared.coordinate(query, keys, fetch, **since)

    def _fallback(
        self, query: FetchQuery, keys: list[str], exc: BaseException
    ) -> dict[str, CachedExperience]:
        """Stale entries within the stale-if-error window; the rest render defaults."""
        if self.telemetry is not None:
            self.telemetry.fetch_failed(exc)
        if isinstance(exc, CircuitOpenError):
            self.stats.skipped_calls += 1
            self._log.debug("circuit", "personalize: %s; serving stale or defaults", exc)
        elif isinstance(exc, APIError):
            self.stats.upstream_failures += 1
            self._log.warning(
                type(exc).__name__,
                "personalize: fetch failed (%s: %s); serving stale or defaults",
                type(exc).__name__,
                exc,
            )
        else:
            self.stats.upstream_failures += 1
            self._log.exception(
                "unexpected", "personalize: unexpected error while fetching", exc_info=exc
            )
        return self._stale_entries(query, keys)

    def stale(self, query: FetchQuery, keys: Iterable[str]) -> dict[str, Experience | None]:
        """What stale-if-error holds for ``keys`` now, for a page whose latency budget ran
        out while the upstream is still silent: a hang is an error the page cannot wait
        to see, and stale content beats the defaults."""
        return {k: e.experience for k, e in self._stale_entries(query, keys).items()}

    def stale_entries(self, query: FetchQuery, keys: Iterable[str]) -> dict[str, CachedExperience]:
        """``stale`` with each entry's ``fetched_at`` (for the ``Decision``'s age)."""
        return self._stale_entries(query, keys)

    def _stale_entries(self, query: FetchQuery, keys: Iterable[str]) -> dict[str, CachedExperience]:
        contexts = self._l1.get(self._key(query))
        entries = contexts.get(query.context_key) if contexts is not None else None
        if not entries:
            return {}
        now = self.clock()
        forgotten = self._forgotten
        stale = {
            k: e
            for k in keys
            if (e := entries.get(k)) is not None
            and now - e.fetched_at < self.sie_until
            and e.fetched_at >= forgotten.get(k, -1.0)
        }
        self.stats.fallbacks += len(stale)
        if self.telemetry is not None:
            self.telemetry.cache_result("fallback", len(stale))
        return stale

    def _remember(self, query: FetchQuery, entries: Mapping[str, CachedExperience]) -> None:
        ident = self._key(query)
        contexts = self._l1.get(ident, {})
        current = contexts.pop(query.context_key, None) or {}
        for key, entry in entries.items():
            old = current.get(key)
            if old is None or old.fetched_at <= entry.fetched_at:
                experience = entry.experience
                if experience is not None:
                    # One object for identical answers (``_intern``): ~85% less memory.
                    shared = self._interner.intern(experience)
                    if shared is not experience:
                        self.stats.interned += 1
                        entry = CachedExperience(shared, entry.fetched_at)
                current[key] = entry
        contexts[query.context_key] = current  # most recently used last
        while len(contexts) > self.max_contexts:
            contexts.pop(next(iter(contexts)))
        self._l1[ident] = contexts  # re-set: renews the retention timer

    def _key(self, query: FetchQuery) -> str:
        return query.identity_hash if self._by_digest else query.identity_key

    def ages(self, query: FetchQuery, keys: Iterable[str]) -> dict[str, float]:
        """Seconds since L1's entries for ``keys`` were fetched (keys without one left out)."""
        try:
            entries = self._l1[self._key(query)][query.context_key]  # as in lookup
        except KeyError:
            return {}
        now = self.clock()
        return {k: now - e.fetched_at for k in keys if (e := entries.get(k)) is not None}

    # -- management ----------------------------------------------------------------------

    async def invalidate(self, identity: Identity) -> None:
        """Forget ``identity`` (login, logout, profile change) here and in L2; a fetch of it
        in flight, here or in another process, writes nothing afterwards."""
        digest = identity_hash(identity)
        own = digest if self._by_digest else identity.cache_key
        self.drop_identity(digest, own)
        if self.shared is not None:
            await self.shared.invalidate(identity)
            # A fetch begun while L2 was being invalidated may have read the old entries.
            self.drop_identity(digest, own)

    def drop_identity(self, digest: str, l1_key: str | None = None) -> None:
        """Forget the identity (``digest``; ``l1_key`` unless L1 is keyed by digest) in L1
        and detach its fetches in flight: they answer their waiters but write nothing."""
        self._l1.pop(l1_key or digest, None)
        self._flights.detach(digest)

    def _on_broadcast(self, message: Mapping[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "invalidate" and isinstance(digest := message.get("id"), str):
            self.drop_identity(digest)
        elif kind == "refresh" and isinstance(keys := message.get("keys"), list):
            self.forget(k for k in keys if isinstance(k, str))

    def forget(self, keys: Iterable[str], at: float | None = None) -> None:
        """Entries of ``keys`` fetched before ``at`` (now) are misses, in L1 and from L2
        (a paused or changed campaign); checked when read, not searched for."""
        at = self.clock() if at is None else at
        for key in keys:
            self._forgotten[key] = max(at, self._forgotten.get(key, at))

    def __len__(self) -> int:
        return len(self._l1)

    def reset_after_fork(self) -> None:
        """In a forked child: fetches in flight are the parent's loop's (entries stay)."""
        abandon((self._tasks, self._flights))
        self._tasks = set()
        self._flights = Flights()

    async def start(self) -> None:
        if self.shared is not None:
            await self.shared.start()

    async def aclose(self) -> None:
        """Let fetches in flight finish briefly (they fill the cache), then stop."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.shared is not None:
            await self.shared.aclose()
