"""How the batcher delivers one batch, and what it does with each answer of the API.

=====================  ===================================================================
answer                 what happens
=====================  ===================================================================
success                acknowledged (deleted from the outbox), counted in ``sent``
5xx, 429, timeout      retried with the ``RetryPolicy``'s backoff with jitter (at least
                       the ``Retry-After`` of a 429), the SAME ``moe_event_uuid``s, for as
                       long as the actions are younger than ``max_event_age`` (then
                       ``dropped_expired``); ``max_retries`` adds a limit on attempts
413                    the body was too large: the batch is split in halves (and later
                       batches kept under half that size) until each part is accepted; an
                       action refused alone is dropped (``dropped_rejected``)
400                    the batch is split in halves until the refused action is alone;
                       only that one is dropped (with a log line), the rest is delivered.
                       Splits are budgeted per batch (about 2*log2(n)): when everything
                       is refused (a wrong MOE-APPKEY answers 400) the rest is dropped
                       with an error log instead of costing one call per event
401                    configuration error: logged at ERROR, the batch is KEPT and the
                       sender pauses ``auth_pause`` seconds before trying again
anything else          dropped with an error log (never kills the task)
=====================  ===================================================================

``Delivery`` is a mixin of ``EventBatcher``: it reads the batcher's settings when it runs
(``policy``, ``max_retries``, ... may be changed on a running batcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .._exceptions import APIError, AuthenticationError, BadRequestError, OutboxUnavailableError
from .._interfaces import EventOutbox, OutboxEntry, PersonalizeBackend
from .._logging import RateLimitedLog
from .._retry import RetryPolicy
from ._fair import body_size, group
from ._outbox import MemoryOutbox

__all__ = ["MIN_BATCH_BYTES", "BatcherStats", "Delivery"]

logger = logging.getLogger("personalize_middleware.events")

#: Below this a 413 no longer lowers the batch size: the API's limit cannot be that low.
MIN_BATCH_BYTES = 16 * 1024


@dataclass(slots=True)
class BatcherStats:
    """Counters in actions (one impression or click each); ``dropped`` is the sum of the
    ``dropped_*`` reasons. ``left_in_outbox``: left in a durable outbox at shutdown for
    the next process (not lost); ``split_too_large``: batches split after a 413."""

    queued: int = 0
    sent: int = 0
    retried: int = 0
    calls: int = 0
    failed_calls: int = 0
    split_too_large: int = 0
    left_in_outbox: int = 0
    dropped_overflow: int = 0
    dropped_flood: int = 0
    dropped_unstored: int = 0
    dropped_rejected: int = 0
    dropped_failed: int = 0
    dropped_expired: int = 0
    dropped_shutdown: int = 0

    #: Where counter changes are reported (``EventBatcher.telemetry`` sets it).
    report: Callable[[str, int], None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __setattr__(self, name: str, value: object) -> None:
        # Every counter change reaches the telemetry, wherever in the batcher, its intake
        # or its delivery the counter is bumped (one place instead of one call per bump).
        try:
            report = object.__getattribute__(self, "report")
        except AttributeError:  # being initialised
            report = None
        if report is not None and name != "report" and isinstance(value, int):
            delta = value - getattr(self, name)
            if delta:
                report(name, delta)
        object.__setattr__(self, name, value)

    @property
    def dropped(self) -> int:
        return (
            self.dropped_overflow
            + self.dropped_flood
            + self.dropped_unstored
            + self.dropped_rejected
            + self.dropped_failed
            + self.dropped_expired
            + self.dropped_shutdown
        )


class Delivery:
    """Sends one batch until it is delivered, split, given up or left for shutdown."""

    backend: PersonalizeBackend
    stats: BatcherStats
    policy: RetryPolicy
    max_retries: int | None
    max_event_age: float
    max_batch_bytes: int
    call_timeout: float
    _closing: bool
    _deadline: float
    _stop: asyncio.Event
    outbox: EventOutbox
    _memory: MemoryOutbox | None
    _leftover: list[OutboxEntry]
    _unacked: list[OutboxEntry]
    _log: RateLimitedLog

    async def _deliver(self, batch: list[OutboxEntry], splits: list[int] | None = None) -> None:
        """Deliver ``batch``. ``splits`` is what is left of the batch's budget of 400
        splits (shared by the halves, so a 400 for everything cannot become a storm)."""
        if splits is None:
            splits = [2 * math.ceil(math.log2(len(batch) + 1)) + 2]
        attempt = 0
        while True:
            batch = await self._expire(batch)
            if not batch:
                return
            try:
                await self._call(batch)
            except BadRequestError as exc:
                await self._isolate(batch, exc, splits)
                return
            except AuthenticationError:
                logger.error(
                    "personalize: the events API refused the credentials (401); %d events "
                    "kept, next try in %.0fs. Check the workspace id and the Personalize "
                    "API secret (regenerating it invalidates the old one).",
                    len(batch),
                    self.policy.auth_pause,
                )
                if not await self._pause(self.policy.auth_pause):
                    return await self._leave(batch, "shutdown during the 401 pause")
                continue
            except (APIError, TimeoutError) as exc:
                if isinstance(exc, APIError) and exc.status_code == 413:
                    await self._split_too_large(batch, exc)
                    return
                retryable = isinstance(exc, TimeoutError) or exc.retryable
                if not retryable:
                    return await self._drop(batch, "failed", f"not retryable: {exc}")
                attempt += 1
                if self.max_retries is not None and attempt > self.max_retries:
                    detail = f"gave up after {attempt} tries: {exc}"
                    return await self._drop(batch, "failed", detail)
                self.stats.retried += len(batch)
                if not await self._pause(self.policy.backoff(attempt, exc)):
                    return await self._leave(batch, "shutdown deadline during retries")
                continue
            except Exception as exc:
                logger.exception("personalize: events delivery failed unexpectedly")
                return await self._drop(batch, "failed", f"unexpected {type(exc).__name__}")
            self.stats.sent += len(batch)
            await self._ack(batch)
            return

    async def _call(self, batch: list[OutboxEntry]) -> None:
        elements = group(batch)
        self.stats.calls += 1
        try:
            async with asyncio.timeout(self.call_timeout):
                await self.backend.track_events(elements)
        except BaseException:
            self.stats.failed_calls += 1
            raise

    async def _isolate(
        self, batch: list[OutboxEntry], exc: BadRequestError, splits: list[int]
    ) -> None:
        """A 400 names no element: split until the refused action is alone, drop it."""
        if len(batch) > 1 and splits[0] <= 0:
            self.stats.dropped_rejected += len(batch)
            logger.error(
                "personalize: the events API refuses (400) most of a batch: %s; %d events "
                "dropped without isolating further (check MOE-APPKEY / the workspace id)",
                exc.description or exc.title or exc,
                len(batch),
            )
            await self._ack(batch)
            return
        if len(batch) == 1:
            action = batch[0].action
            logger.warning(
                "personalize: the events API refused an action (%s %s, experience %r): %s; dropped",
                action.get("action"),
                action.get("moe_event_uuid"),
                str(action.get("attributes", {}).get("experience", ""))[:100],
                exc.description or exc.title or exc,
            )
            self.stats.dropped_rejected += 1
            await self._ack(batch)
            return
        splits[0] -= 1
        middle = len(batch) // 2
        await self._deliver(batch[:middle], splits)
        await self._deliver(batch[middle:], splits)

    async def _split_too_large(self, batch: list[OutboxEntry], exc: APIError) -> None:
        """413: halve the batch (and the size of later batches) instead of dropping it."""
        size = body_size(batch)
        if len(batch) == 1:
            self.stats.dropped_rejected += 1
            logger.error(
                "personalize: the events API refused one action of %d bytes as too large "
                "(413); dropped (uuid %s)",
                size,
                batch[0].action.get("moe_event_uuid"),
            )
            await self._ack(batch)
            return
        limit = max(MIN_BATCH_BYTES, min(self.max_batch_bytes, size // 2))
        if limit < self.max_batch_bytes:
            logger.warning(
                "personalize: the events API refused a body of %d bytes (413: %s); batches "
                "are now at most %d bytes (max_batch_bytes)",
                size,
                exc,
                limit,
            )
            self.max_batch_bytes = limit
        self.stats.split_too_large += 1
        middle = len(batch) // 2
        await self._deliver(batch[:middle])
        await self._deliver(batch[middle:])

    async def _expire(self, batch: list[OutboxEntry]) -> list[OutboxEntry]:
        """``batch`` without the actions older than ``max_event_age`` (dropped)."""
        cutoff = time.time() - self.max_event_age
        if not batch or min(entry.enqueued_at for entry in batch) >= cutoff:
            return batch
        old = [entry for entry in batch if entry.enqueued_at < cutoff]
        await self._drop(old, "expired", f"older than max_event_age ({self.max_event_age:g}s)")
        return [entry for entry in batch if entry.enqueued_at >= cutoff]

    async def _pause(self, delay: float) -> bool:
        """Sleep ``delay`` seconds (cut short by shutdown to what its deadline leaves);
        ``False`` when the shutdown deadline has passed."""
        if self._closing:
            delay = min(delay, self._deadline - time.monotonic())
            if delay <= 0:
                return False
            await asyncio.sleep(delay)
            return time.monotonic() < self._deadline
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)
        if self._closing:  # woken by aclose: one more try right away if time allows
            return time.monotonic() < self._deadline
        return True

    async def _drop(self, batch: Sequence[OutboxEntry], reason: str, detail: str) -> None:
        if reason == "shutdown":
            self.stats.dropped_shutdown += len(batch)
        elif reason == "expired":
            self.stats.dropped_expired += len(batch)
        else:
            self.stats.dropped_failed += len(batch)
        logger.error("personalize: %d tracking events dropped (%s)", len(batch), detail)
        await self._ack(list(batch))

    async def _ack(self, entries: list[OutboxEntry]) -> None:
        if self._memory is not None:
            self._memory.ack_nowait(entries)
            return
        try:
            await self.outbox.ack(entries)
        except OutboxUnavailableError as exc:
            self._unacked.extend(entries)  # tried again; if never, MoEngage dedupes
            self._log.warning("ack", "personalize: event outbox ack failed: %s", exc)

    async def _leave(self, batch: list[OutboxEntry], detail: str) -> None:
        """Shutdown cut delivery short: a durable outbox keeps the actions."""
        if self._memory is None:
            self._leftover.extend(batch)
            return
        await self._drop(batch, "shutdown", detail)
