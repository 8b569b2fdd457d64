"""The experience store: per-user L1 cache, single-flight, shedding, stale content, and
per-client limits on cache-miss fetches (``ClientLimits``).

The optional shared L2 (Redis) is ``cache.redis``; the store depends only on the
``SharedLayer`` protocol of ``personalize_middleware._interfaces``.
"""

from __future__ import annotations

from ._fairness import DEFAULT_CLIENT_LIMITS, ClientKey, ClientLimiter, ClientLimits
from ._stats import (
    DEFAULT_CACHE_MAXSIZE,
    DEFAULT_CACHE_TTL,
    DEFAULT_MAX_CONCURRENT_FETCHES,
    DEFAULT_STALE_IF_ERROR,
    DEFAULT_STALE_WHILE_REVALIDATE,
    StoreStats,
)
from ._store import ExperienceStore

__all__ = [
    "DEFAULT_CACHE_MAXSIZE",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_CLIENT_LIMITS",
    "DEFAULT_MAX_CONCURRENT_FETCHES",
    "DEFAULT_STALE_IF_ERROR",
    "DEFAULT_STALE_WHILE_REVALIDATE",
    "ClientKey",
    "ClientLimiter",
    "ClientLimits",
    "ExperienceStore",
    "StoreStats",
]
