"""``EventRecorder``: where verified impressions and clicks go (an ``EventSink``).

The beacon endpoint (browser impressions and clicks) and the server-side impression hook
both write here; neither knows about the other. The recorder drops a page view's repeats,
gives each event its ``moe_event_uuid``, counts, and queues the MoEngage action on the
batcher.

The ``moe_event_uuid`` is a UUID v4 derived with a server key from (render id, experience
key, kind, b_id): one page view's impression (or click on one button) always carries the
same uuid, so a replayed beacon is dropped here (bounded TTL set) and, should a replay
reach another worker process, deduplicated by MoEngage on that uuid. Retries of a batch
reuse the same uuids.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cachetools import TTLCache

from .._interfaces import Telemetry, TrackedEvent
from .._models import ACTION_CLICKED, ACTION_SHOWN, EventAction, Identity
from .._signing import Keyring, b64url_decode
from ._batcher import BatcherStats

__all__ = ["ActionQueue", "EventRecorder", "TrackingStats", "build_action"]

_EVENT_UUID_PURPOSE = "track-event"


@dataclass(slots=True)
class TrackingStats:
    """Counters of the endpoint and the recorder, plus the batcher's (``queued``,
    ``sent``, ...). ``rejected_bot`` and ``rejected_slow`` count beacons,
    ``rejected_too_soon`` and ``rejected_rate`` count events (of verified beacons),
    ``bot_page_views`` page views whose hooks were left empty for a crawler."""

    beacons: int = 0
    accepted: int = 0
    replays: int = 0
    server_impressions: int = 0
    rejected_malformed: int = 0
    rejected_forbidden: int = 0
    rejected_cross_site: int = 0
    rejected_too_large: int = 0
    rejected_bot: int = 0
    rejected_slow: int = 0
    rejected_too_soon: int = 0
    rejected_rate: int = 0
    bot_page_views: int = 0
    unattributable: int = 0
    batcher: BatcherStats = field(default_factory=BatcherStats)

    @property
    def queued(self) -> int:
        return self.batcher.queued

    @property
    def sent(self) -> int:
        return self.batcher.sent

    @property
    def retried(self) -> int:
        return self.batcher.retried

    @property
    def dropped(self) -> int:
        return self.batcher.dropped


class ActionQueue(Protocol):
    """Where accepted actions are queued for delivery (``EventBatcher`` is one):
    ``enqueue`` at once, ``store`` returning once they are stored (``False``: the outbox
    failed)."""

    def enqueue(self, customer_id: str, action: EventAction) -> bool: ...

    async def store(self, items: Sequence[tuple[str, EventAction]]) -> bool: ...


def build_action(event: TrackedEvent, *, event_uuid: str, now: float) -> EventAction:
    """The MoEngage action for one verified event.

    ``attributes`` is the experience's ``experience_context`` copied field by field.
    WIRE.md: the spec's schema puts ``b_id`` beside ``attributes`` but its own click
    examples put it inside; we follow the examples. This is the one place that decides.
    """
    attributes = dict(event.context)
    if event.b_id is not None:
        attributes["b_id"] = event.b_id
    return {
        "action": ACTION_CLICKED if event.kind == "clicked" else ACTION_SHOWN,
        "moe_event_uuid": event_uuid,
        "event_time": int(now),
        "platform": "web",
        "attributes": attributes,
    }


class EventRecorder:
    """Dedupes, counts and queues verified events (implements ``EventSink``).

    ``replay_window`` is how long a page view's event is remembered: a token cannot be
    replayed after it expires, so the token lifetime (plus clock slack) is enough.
    """

    def __init__(
        self,
        *,
        keyring: Keyring,
        queue: ActionQueue,
        stats: TrackingStats,
        replay_window: float,
        replay_cache_size: int,
    ) -> None:
        self._keyring = keyring
        self._queue = queue
        self.stats = stats
        self._seen: TTLCache[str, bool] = TTLCache(maxsize=replay_cache_size, ttl=replay_window)
        self.telemetry: Telemetry | None = None  # set by PersonalizeMiddleware(telemetry=...)

    def record(self, identity: Identity, event: TrackedEvent, now: float) -> bool:
        """Queue one verified event unless this page view already reported it."""
        admitted = self._admit(identity, event, now)
        if admitted is None:
            return False
        self.stats.accepted += 1
        if self.telemetry is not None:
            self.telemetry.event_accepted(event)
        return self._queue.enqueue(*admitted)

    async def record_all(
        self,
        identity: Identity,
        events: Sequence[TrackedEvent],
        now: float,
        event_uuids: Sequence[str] | None = None,
    ) -> bool:
        """Record a beacon's events and return once they are stored: ``False`` when the
        outbox could not store them (they are then not remembered as seen either).
        ``event_uuids``: the events' ``event_uuid``, when the caller has them already."""
        uuids = event_uuids if event_uuids is not None else [None] * len(events)
        admitted = [
            (event, item)
            for event, uuid_ in zip(events, uuids, strict=True)
            if (item := self._admit(identity, event, now, uuid_)) is not None
        ]
        items = [item for _, item in admitted]
        if not items:
            return True
        if not await self._queue.store(items):
            for _, action in items:
                self._seen.pop(action["moe_event_uuid"], None)
            return False
        self.stats.accepted += len(items)
        if (telemetry := self.telemetry) is not None:
            for event, _ in admitted:
                telemetry.event_accepted(event)
        return True

    def _admit(
        self,
        identity: Identity,
        event: TrackedEvent,
        now: float,
        event_uuid: str | None = None,
    ) -> tuple[str, EventAction] | None:
        """The (customer id, action) to queue, or ``None`` (a replay, no customer id).
        Every check an event must pass belongs here: ``record`` and ``record_all`` both
        go through it."""
        stats = self.stats
        customer_id = identity.api_customer_id
        if customer_id is None:
            stats.unattributable += 1
            return None
        if event_uuid is None:
            event_uuid = self.event_uuid(event)
        if event_uuid in self._seen:
            stats.replays += 1
            return None
        self._seen[event_uuid] = True
        return customer_id, build_action(event, event_uuid=event_uuid, now=now)

    def seen(self, event_uuid: str) -> bool:
        """Whether the event with this uuid was recorded (or burnt) already."""
        return event_uuid in self._seen

    def burn(self, event_uuid: str) -> None:
        """Remember an event as seen without queueing it: a refused event (too early to
        be a person's) cannot come back later as a first report."""
        self._seen[event_uuid] = True

    def event_uuid(self, event: TrackedEvent) -> str:
        """The ``moe_event_uuid`` of ``event``: the same for every report of it."""
        name = "\x00".join((event.render_id, event.key, event.kind, event.b_id or ""))
        mac = b64url_decode(self._keyring.sign(_EVENT_UUID_PURPOSE, name.encode()))
        return str(uuid.UUID(bytes=mac[:16], version=4))
