"""Impressions and clicks: template hooks, signed tokens, the beacon endpoint, the event
recorder and the batcher that delivers to the Track Experience Events API; crawler
detection (``is_bot``) and the human-rate rules (``TrackingLimits``).
"""

from __future__ import annotations

from ._batcher import BatcherStats, EventBatcher
from ._bots import is_bot
from ._guard import TrackingLimits
from ._hooks import (
    CLICK_ATTR,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_TOKEN_TTL,
    IMPRESSION_ATTR,
    Tracking,
)
from ._outbox import MemoryOutbox
from ._outbox_choice import outbox_from_settings
from ._outbox_redis import RedisOutbox
from ._outbox_sqlite import SQLiteOutbox
from ._recorder import EventRecorder, TrackingStats
from ._tokens import (
    MAX_B_ID_LENGTH,
    TrackingToken,
    decode_token,
    decode_tokens,
    encode_token,
    experience_token_part,
    validate_b_id,
)

__all__ = [
    "CLICK_ATTR",
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_TOKEN_TTL",
    "IMPRESSION_ATTR",
    "MAX_B_ID_LENGTH",
    "BatcherStats",
    "EventBatcher",
    "EventRecorder",
    "MemoryOutbox",
    "RedisOutbox",
    "SQLiteOutbox",
    "Tracking",
    "TrackingLimits",
    "TrackingStats",
    "TrackingToken",
    "decode_token",
    "decode_tokens",
    "encode_token",
    "experience_token_part",
    "is_bot",
    "outbox_from_settings",
    "validate_b_id",
]
