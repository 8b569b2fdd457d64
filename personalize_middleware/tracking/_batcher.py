"""``EventBatcher``: delivers the actions in an event outbox to the events API.

Accepted actions are stored in an ``EventOutbox`` (``_outbox``: in memory by default, or a
SQLite file, or a Redis stream shared by every process). One background task leases them
(``take``), holds them by visitor (``FairBuffer``) and sends calls of at most
``max_elements`` users and ``max_batch_bytes`` bytes, filled round-robin across visitors,
once ``max_elements`` actions are waiting or ``flush_interval`` seconds after the oldest
was stored. An entry leaves the outbox (``ack``) only once MoEngage accepted it, or once
it is given up (counted and logged); what each answer of the API leads to is in
``_delivery``. Retries are bounded by age (``max_event_age``), never by a count.

``aclose`` delivers what it can within its deadline. With a durable outbox what is left
stays there for the next process (``left_in_outbox``); in memory it is counted as
``dropped_shutdown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from .._config import positive_int, positive_number
from .._exceptions import ConfigurationError, OutboxUnavailableError
from .._fork import abandon, register
from .._interfaces import EventOutbox, OutboxEntry, PersonalizeBackend, Telemetry
from .._lifecycle import Lifecycle
from .._logging import RateLimitedLog
from .._models import EventAction
from .._retry import DEFAULT_RETRY_POLICY, RetryPolicy
from ._delivery import BatcherStats, Delivery
from ._fair import FairBuffer
from ._intake import Intake
from ._outbox import DEFAULT_MAX_PER_VISITOR, DEFAULT_MAX_QUEUE, MemoryOutbox

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_EVENT_AGE",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "BatcherStats",
    "EventBatcher",
]

logger = logging.getLogger("personalize_middleware.events")

DEFAULT_MAX_ELEMENTS = 100
#: An events call's body stays under this (the API answers 413 to a body too large).
DEFAULT_MAX_BATCH_BYTES = 512 * 1024
DEFAULT_FLUSH_INTERVAL = 1.0
#: Actions older than this are given up: an outage of the events API shorter than this
#: loses nothing that fits the outbox.
DEFAULT_MAX_EVENT_AGE = 3600.0
DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
_DURABLE_WINDOW = 1_000  # entries a durable outbox leases to the sender at a time

_Pair = tuple[str, EventAction]


class EventBatcher(Intake, Delivery):
    """Delivers the actions of an ``EventOutbox`` through ``backend.track_events``.

    ``store`` (async) returns once the actions are stored; ``enqueue`` (sync) queues one
    action (in memory at once; for a durable outbox it is written in the background).
    ``start`` / ``flush`` / ``aclose`` run the sender. ``outbox`` defaults to a
    ``MemoryOutbox(max_queue=, max_per_visitor=)``; pass a ``SQLiteOutbox`` or a
    ``RedisOutbox`` for events that survive the process.
    """

    def __init__(
        self,
        backend: PersonalizeBackend,
        *,
        outbox: EventOutbox | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_per_visitor: int = DEFAULT_MAX_PER_VISITOR,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_event_age: float = DEFAULT_MAX_EVENT_AGE,
        max_retries: int | None = None,
        policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        backoff_initial: float | None = None,
        backoff_max: float | None = None,
        auth_pause: float | None = None,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        if not 1 <= max_elements <= 100:
            raise ConfigurationError("max_elements must be 1..100", field="max_elements")
        if max_queue < 1 or (max_retries is not None and max_retries < 0):
            raise ConfigurationError("max_queue must be >= 1, max_retries >= 0", field="max_queue")
        positive_int("max_batch_bytes", max_batch_bytes)
        for name, value in (
            ("flush_interval", flush_interval),
            ("max_event_age", max_event_age),
            ("call_timeout", call_timeout),
            ("shutdown_timeout", shutdown_timeout),
        ):
            positive_number(name, value)
        self.backend = backend
        if outbox is None:
            outbox = MemoryOutbox(max_queue=max_queue, max_per_visitor=max_per_visitor)
        self.outbox: EventOutbox = outbox
        self._memory = outbox if isinstance(outbox, MemoryOutbox) else None
        self.max_queue = max_queue
        self.max_elements = max_elements
        self.max_batch_bytes = max_batch_bytes
        self.flush_interval = flush_interval
        self.max_event_age = max_event_age
        self.max_retries = max_retries
        shortcuts = {
            name: value
            for name, value in (
                ("backoff_initial", backoff_initial),
                ("backoff_max", backoff_max),
                ("auth_pause", auth_pause),
            )
            if value is not None
        }
        #: Backoff between attempts and the 401 / 429 pauses (``backoff_initial``,
        #: ``backoff_max`` and ``auth_pause`` are shortcuts that override its fields).
        self.policy = dataclasses.replace(policy, **shortcuts) if shortcuts else policy
        self.call_timeout = call_timeout
        self.shutdown_timeout = shutdown_timeout
        self.stats = BatcherStats()
        self._telemetry: Telemetry | None = None
        self._buffer = FairBuffer()
        # A memory outbox hands over everything at once; a durable one a window at a time.
        self._window = self._memory.max_queue if self._memory is not None else _DURABLE_WINDOW
        self._refill_below = self._window if self._memory is not None else _DURABLE_WINDOW // 2
        self._inflight: list[OutboxEntry] = []
        self._leftover: list[OutboxEntry] = []  # durable: to release at shutdown
        self._unacked: list[OutboxEntry] = []  # durable: delivered, ack failed; retried
        self._staged: list[_Pair] = []  # durable: enqueue()d, not written yet
        self._stager: asyncio.Task[None] | None = None
        self._stored_since_take = 0
        self._outbox_open = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._flush_requested = False
        self._closing = False
        self._closed = False
        self._deadline = float("inf")
        self._task: asyncio.Task[None] | None = None
        self._state = Lifecycle.NEW
        self._log = RateLimitedLog(logger)
        register(self)

    def __repr__(self) -> str:
        return f"EventBatcher(pending={self.pending}, outbox={self.outbox!r}, stats={self.stats})"

    @property
    def telemetry(self) -> Telemetry | None:
        """Told of every counter change and of the outbox's depth
        (``PersonalizeMiddleware(telemetry=...)`` sets it)."""
        return self._telemetry

    @telemetry.setter
    def telemetry(self, telemetry: Telemetry | None) -> None:
        self._telemetry = telemetry

        def report(outcome: str, count: int) -> None:
            if telemetry is not None:
                telemetry.events_counted(outcome, count)
                telemetry.outbox_depth(self.pending)

        self.stats.report = None if telemetry is None else report

    def _report_depth(self) -> None:
        if self._telemetry is not None:
            self._telemetry.outbox_depth(self.pending)

    @property
    def state(self) -> Lifecycle:
        """``NEW`` until started, ``RUNNING``, ``CLOSING`` while ``aclose`` flushes, ``CLOSED``."""
        return self._state

    @property
    def durable(self) -> bool:
        """True when stored actions survive this process (SQLite or Redis outbox)."""
        return self._memory is None and bool(self.outbox.durable)

    @property
    def pending(self) -> int:
        """Actions stored and not delivered yet (for a shared outbox: every process's, as
        last seen)."""
        if self._memory is not None:
            return self._memory.pending
        return self.outbox.pending + len(self._staged)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open_outbox(self) -> None:
        if self._outbox_open:
            return
        self._outbox_open = True  # before awaiting: concurrent callers start it once
        try:
            await self.outbox.start()
        except BaseException:
            self._outbox_open = False
            raise

    async def start(self) -> None:
        """Open the outbox and start the sender task (idempotent; a closed batcher can be
        started again)."""
        if self._task is not None:
            return
        await self._open_outbox()
        # Fresh events, bound to the running loop (a test client may run a new loop for
        # every lifespan).
        self._wake, self._stop, self._idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._closing = self._closed = False
        self._deadline = float("inf")
        self._wake.set()
        self._task = asyncio.create_task(self._run(), name="personalize-event-batcher")
        self._state = Lifecycle.RUNNING
        if self._staged and self._stager is None:
            self._stager = asyncio.create_task(self._write_staged())

    async def flush(self) -> None:
        """Send everything stored now and wait until it is delivered or dropped."""
        if self._task is None:
            await self.start()
        if self._stager is not None:
            await self._stager
        self._flush_requested = True
        self._idle.clear()
        self._wake.set()
        await self._idle.wait()

    async def aclose(self, timeout: float | None = None) -> None:
        """Deliver what is stored within ``timeout`` seconds (``shutdown_timeout`` by
        default), then stop. What is left stays in a durable outbox (released at once to
        the other processes); in memory it is counted as ``dropped_shutdown``."""
        if self._closed:
            return
        self._closed = True
        self._state = Lifecycle.CLOSING
        timeout = self.shutdown_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + timeout
        self._closing = True
        self._wake.set()
        self._stop.set()
        if self._staged and self._stager is None:  # enqueue()d before a loop ran
            self._stager = asyncio.create_task(self._write_staged())
        if self._stager is not None:
            await asyncio.wait({self._stager}, timeout=max(timeout, 0) + 0.05)
        task, self._task = self._task, None
        if task is None and self._memory is not None and self._memory.pending:
            task = asyncio.create_task(self._run())  # never started: send what was queued
        inflight: list[OutboxEntry] = []
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=max(timeout, 0) + 0.05)
            if not done:
                inflight = list(self._inflight)  # the sender's batch when it was cut short
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._inflight = []
        if self._memory is not None:
            self._close_memory(timeout)
        else:
            await self._close_durable(inflight)
        self._idle.set()
        self._state = Lifecycle.CLOSED
        self._report_depth()

    def _close_memory(self, timeout: float) -> None:
        assert self._memory is not None
        self._buffer.drain()
        left = self._memory.clear()
        if left:
            self.stats.dropped_shutdown += left
            logger.error(
                "personalize: %d tracking events not delivered before shutdown (deadline %.1fs)",
                left,
                timeout,
            )

    async def _close_durable(self, inflight: list[OutboxEntry]) -> None:
        if self._stager is not None:
            self._stager.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stager
        if self._staged:
            self.stats.dropped_shutdown += len(self._staged)
            logger.error(
                "personalize: %d tracking events not written before shutdown", len(self._staged)
            )
            self._staged = []
        left = self._leftover + self._buffer.drain() + inflight
        self._leftover = []
        with contextlib.suppress(OutboxUnavailableError):
            if self._unacked:
                await self.outbox.ack(self._unacked)
                self._unacked = []
            if left:
                await self.outbox.release(left)  # else their lease times out
        if left:
            self.stats.left_in_outbox += len(left)
            logger.warning(
                "personalize: %d tracking events not delivered before shutdown; they stay in "
                "the outbox for the next process",
                len(left),
            )
        with contextlib.suppress(OutboxUnavailableError):
            await self.outbox.aclose()
        self._outbox_open = False

    def reset_after_fork(self) -> None:
        """In a forked child (``_fork``): the sender task and its events are the parent's
        loop's and never run here; the child starts its own. Events the parent queued in
        memory are the parent's to deliver: sending them from every child would duplicate
        them. A durable outbox opened before the fork (a warm-up) is reopened here."""
        idle = self._task is None and self._stager is None and not self._outbox_open
        if idle and (self._memory is None or not self._memory.pending):
            return
        abandon((self._task, self._stager, self._wake, self._stop, self._idle))
        self._task = self._stager = None
        if self._memory is not None:
            self._memory.clear()
        self._buffer.drain()
        self._staged, self._inflight = [], []
        if self._outbox_open:  # opened before the fork (a warm-up): this child reopens it
            reset = getattr(self.outbox, "reset_after_fork", None)
            if reset is not None:
                reset()
            self._outbox_open = False
        self._wake, self._stop, self._idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._closing = self._closed = False
        self._state = Lifecycle.NEW

    # -- the sender --------------------------------------------------------------------------

    async def _run(self) -> None:
        buffer = self._buffer
        while True:
            if self._closing and time.monotonic() >= self._deadline:
                return
            if self._unacked:
                unacked, self._unacked = self._unacked, []
                await self._ack(unacked)
            if len(buffer) < self._refill_below:
                await self._refill()
            if not buffer:
                self._report_depth()
                if self._closing:
                    return
                self._flush_requested = False
                if self._stager is None and not self._staged:
                    self._idle.set()
                await self._sleep(self.flush_interval if self._memory is None else None)
                continue
            wait = self._until_ready()
            if wait > 0:
                await self._sleep(wait)
                continue
            batch = buffer.next_batch(self.max_elements, self.max_batch_bytes)
            self._inflight = batch
            await self._deliver(batch)
            self._inflight = []
            self._report_depth()

    async def _refill(self) -> None:
        want = self._window - len(self._buffer)
        if self._memory is not None:
            entries = self._memory.take_nowait(want)
        else:
            self._stored_since_take = 0
            try:
                entries = await self.outbox.take(want)
            except OutboxUnavailableError as exc:
                self._log.warning("take", "personalize: event outbox unreadable: %s", exc)
                return
        if entries:
            self._buffer.add(entries)

    def _until_ready(self) -> float:
        """Seconds until a batch is due: a full batch is waiting, the oldest action has
        waited ``flush_interval``, or a flush / shutdown asks for everything now."""
        if self._flush_requested or self._closing or len(self._buffer) >= self.max_elements:
            return 0.0
        return max(0.0, self._buffer.oldest() + self.flush_interval - time.time())

    async def _sleep(self, timeout: float | None) -> None:
        self._wake.clear()
        if timeout is None:
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
