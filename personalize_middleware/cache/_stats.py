"""The store's defaults and counters."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_CACHE_MAXSIZE",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_MAX_CONCURRENT_FETCHES",
    "DEFAULT_MAX_CONTEXTS_PER_IDENTITY",
    "DEFAULT_STALE_IF_ERROR",
    "DEFAULT_STALE_WHILE_REVALIDATE",
    "StoreStats",
]

DEFAULT_CACHE_TTL = 60.0
DEFAULT_STALE_WHILE_REVALIDATE = 300.0
DEFAULT_STALE_IF_ERROR = 3600.0
DEFAULT_CACHE_MAXSIZE = 100_000
DEFAULT_MAX_CONTEXTS_PER_IDENTITY = 8
#: Upstream fetches in flight per process; beyond it a miss renders stale content or the
#: defaults without a call. Matches the client's default pool: queueing more requests
#: than there are connections only burns CPU in the pool while the upstream is slow.
DEFAULT_MAX_CONCURRENT_FETCHES = 100


@dataclass(slots=True)
class StoreStats:
    """Counters, readable by the app (``middleware.store.stats``)."""

    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    coalesced: int = 0
    upstream_calls: int = 0
    upstream_failures: int = 0
    fallbacks: int = 0
    skipped_calls: int = 0
    shed: int = 0
    client_limited: int = 0
    interned: int = 0
    extra: dict[str, int] = field(default_factory=dict)
