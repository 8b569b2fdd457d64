"""How actions get into the batcher's outbox: ``enqueue`` (sync) and ``store`` (async).

``Intake`` is a mixin of ``EventBatcher``. A memory outbox takes an action synchronously
(the fast path of the beacon endpoint and of server-side impressions). A durable outbox
is written off the event loop: ``store`` returns once the write is done (the endpoint
answers 204 only then), ``enqueue`` hands the action to a background writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from .._exceptions import OutboxUnavailableError
from .._interfaces import EventOutbox
from .._logging import RateLimitedLog
from .._models import EventAction
from ._delivery import BatcherStats
from ._fair import FairBuffer
from ._outbox import DEFAULT_MAX_PER_VISITOR, MemoryOutbox

__all__ = ["STAGE_LIMIT", "Intake"]

logger = logging.getLogger("personalize_middleware.events")

#: ``enqueue()``d actions waiting to be written to a durable outbox.
STAGE_LIMIT = 10_000

_Pair = tuple[str, EventAction]


class Intake:
    """``enqueue`` / ``store`` and the counting of what a bound refused."""

    outbox: EventOutbox
    stats: BatcherStats
    max_elements: int
    _memory: MemoryOutbox | None
    _buffer: FairBuffer
    _closing: bool
    _wake: asyncio.Event
    _idle: asyncio.Event
    _staged: list[_Pair]
    _stager: asyncio.Task[None] | None
    _stored_since_take: int
    _log: RateLimitedLog

    @property
    def pending(self) -> int:
        raise NotImplementedError

    async def _open_outbox(self) -> None:
        raise NotImplementedError

    def enqueue(self, customer_id: str, action: EventAction) -> bool:
        """Queue one action for ``customer_id``; ``False`` when it was dropped (queue
        full, the visitor's share full, or the batcher is closed). For a durable outbox
        the action is written in the background (``store`` waits for the write)."""
        if self._closing:
            self._refused("closed", 1)
            return False
        memory = self._memory
        if memory is None:
            return self._stage(customer_id, action)
        outcome = memory.put_nowait(customer_id, action, time.time())
        if outcome != "stored":
            self._refused(outcome, 1)
            return False
        self.stats.queued += 1
        self._idle.clear()
        waiting = memory.queued
        buffered = len(self._buffer)
        # The sender sleeps without a timer only when it holds nothing: wake it for the
        # first action (to start the interval) and for a full batch.
        if (waiting == 1 and not buffered) or waiting + buffered >= self.max_elements:
            self._wake.set()
        return True

    async def store(self, items: Sequence[_Pair]) -> bool:
        """Store actions and return once they are stored (written, for a durable
        outbox). ``False`` only when the outbox failed (the beacon endpoint then answers
        503); actions refused by a bound are counted as dropped and still ``True``."""
        if self._memory is not None:
            for customer_id, action in items:
                self.enqueue(customer_id, action)
            return True
        if self._closing:
            self._refused("closed", len(items))
            return False
        try:
            await self._put(items)
        except OutboxUnavailableError as exc:
            self._unstored(len(items), exc)
            return False
        return True

    async def _put(self, items: Sequence[_Pair]) -> None:
        await self._open_outbox()
        result = await self.outbox.put(items, time.time())
        self.stats.queued += result.stored
        if result.full:
            self._refused("full", result.full)
        if result.flood:
            self._refused("flood", result.flood)
        if result.stored:
            self._idle.clear()
            self._stored_since_take += result.stored
            if self._stored_since_take >= self.max_elements:
                self._wake.set()

    def _stage(self, customer_id: str, action: EventAction) -> bool:
        if len(self._staged) >= STAGE_LIMIT:
            self._refused("full", 1)
            return False
        self._staged.append((customer_id, action))
        self._idle.clear()
        if self._stager is None:
            with contextlib.suppress(RuntimeError):  # no loop yet: written at start
                self._stager = asyncio.get_running_loop().create_task(self._write_staged())
        return True

    async def _write_staged(self) -> None:
        try:
            while self._staged:
                items, self._staged = self._staged, []
                try:
                    await self._put(items)
                except OutboxUnavailableError as exc:
                    self._unstored(len(items), exc)
        finally:
            self._stager = None

    def _refused(self, reason: str, count: int) -> None:
        if reason == "flood":
            self.stats.dropped_flood += count
            self._log.warning(
                "flood",
                "personalize: a visitor has %d tracking events waiting already; %d more "
                "dropped (max_per_visitor)",
                getattr(self.outbox, "max_per_visitor", DEFAULT_MAX_PER_VISITOR),
                count,
            )
            return
        self.stats.dropped_overflow += count
        self._log.warning(
            "overflow",
            "personalize: event queue %s (%d actions); event dropped",
            "closed" if reason == "closed" else "full",
            self.pending,
        )

    def _unstored(self, count: int, exc: BaseException) -> None:
        self.stats.dropped_unstored += count
        self._log.error(
            "unstored", "personalize: %d tracking events could not be stored: %s", count, exc
        )
