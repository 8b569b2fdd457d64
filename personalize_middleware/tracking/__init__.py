"""Impressions and clicks: template hooks, signed tokens, the beacon endpoint, the event
recorder and the batcher that delivers to the Track Experience Events API.
"""

from __future__ import annotations

from ._batcher import BatcherStats, EventBatcher
from ._hooks import CLICK_ATTR, DEFAULT_TOKEN_TTL, IMPRESSION_ATTR, Tracking, TrackingStats
from ._recorder import EventRecorder
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
    "DEFAULT_TOKEN_TTL",
    "IMPRESSION_ATTR",
    "MAX_B_ID_LENGTH",
    "BatcherStats",
    "EventBatcher",
    "EventRecorder",
    "Tracking",
    "TrackingStats",
    "TrackingToken",
    "decode_token",
    "decode_tokens",
    "encode_token",
    "experience_token_part",
    "validate_b_id",
]
