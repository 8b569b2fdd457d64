"""The shared L2 in Redis: layer, cross-process lease, budget, broadcast, codec, key names,
connection (one Redis, a Cluster or Sentinel), rate limiter.

``KeyNames`` is for any feature that keeps a workspace's data in Redis: its keys carry the
``{workspace}`` hash tag, so they share one Redis Cluster slot with the layer's.

Imported only when ``redis_url`` is set or ``RedisSharedLayer`` is used: the ``redis``
package itself is imported lazily by ``_connection.import_redis`` (extra ``[redis]``).
"""

from __future__ import annotations

from ._connection import RedisConnection, RedisStats, Unavailable, import_redis, mask_url
from ._keys import KeyNames
from ._layer import (
    DEFAULT_LEASE_TTL,
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_OP_TIMEOUT,
    DEFAULT_RATE_LIMIT_PER_MINUTE,
    DEFAULT_STALL_TOLERANCE,
    RedisSharedLayer,
)

__all__ = [
    "DEFAULT_LEASE_TTL",
    "DEFAULT_MAX_VALUE_BYTES",
    "DEFAULT_OP_TIMEOUT",
    "DEFAULT_RATE_LIMIT_PER_MINUTE",
    "DEFAULT_STALL_TOLERANCE",
    "KeyNames",
    "RedisConnection",
    "RedisSharedLayer",
    "RedisStats",
    "Unavailable",
    "import_redis",
    "mask_url",
]
