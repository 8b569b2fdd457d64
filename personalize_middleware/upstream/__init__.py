"""The way to MoEngage: the HTTP client, the circuit breaker, the metadata watcher.

Everything that speaks HTTP to the Personalize API lives here; the wire contract shared
with the local engine (batch sizes, request bodies) is ``personalize_middleware._contract``.
"""

from __future__ import annotations

from ._breaker import (
    DEFAULT_BREAKER_COOLDOWN,
    DEFAULT_BREAKER_THRESHOLD,
    CircuitBreaker,
)
from ._client import KEEPALIVE_EXPIRY, PersonalizeClient
from ._metadata import DEFAULT_METADATA_REFRESH, MetadataWatcher, suggest_key

__all__ = [
    "DEFAULT_BREAKER_COOLDOWN",
    "DEFAULT_BREAKER_THRESHOLD",
    "DEFAULT_METADATA_REFRESH",
    "KEEPALIVE_EXPIRY",
    "CircuitBreaker",
    "MetadataWatcher",
    "PersonalizeClient",
    "suggest_key",
]
