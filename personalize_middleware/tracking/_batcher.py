"""``EventBatcher``: queues impressions and clicks and delivers them to the events API.

One background task takes up to ``max_elements`` users' actions at a time (the API's limit
is 100 elements a call), once ``max_elements`` actions are waiting or ``flush_interval``
seconds after the first one was queued, and sends them with ``track_events``. Then:

=====================  ===================================================================
answer                 what happens
=====================  ===================================================================
success                counted in ``sent``
5xx, 429, timeout      retried with the ``RetryPolicy``'s backoff with jitter (at least
                       the ``Retry-After`` of a 429), the SAME ``moe_event_uuid``s, up
                       to ``max_retries`` times, then dropped with an error log
400                    the batch is split in halves until the refused action is alone;
                       only that one is dropped (with a log line), the rest is delivered.
                       Splits are budgeted per batch (about 2*log2(n)): when everything
                       is refused (a wrong MOE-APPKEY answers 400) the rest is dropped
                       with an error log instead of costing one call per event
401                    configuration error: logged at ERROR, the batch is KEPT and the
                       sender pauses ``auth_pause`` seconds before trying again (at most
                       one call per pause: fixing the secret and restarting loses nothing
                       that still fits the queue; meanwhile new events fill the bounded
                       queue and overflow is counted)
anything else          dropped with an error log (never kills the task)
=====================  ===================================================================

The queue holds at most ``max_queue`` actions; events beyond are dropped and counted
(``dropped_overflow``) with a rate-limited warning. ``aclose`` delivers what it can within
its deadline and counts the rest as ``dropped_shutdown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .._config import positive_number
from .._exceptions import APIError, AuthenticationError, BadRequestError, ConfigurationError
from .._fork import abandon, register
from .._interfaces import PersonalizeBackend
from .._lifecycle import Lifecycle
from .._logging import RateLimitedLog
from .._models import EventAction, EventElement
from .._retry import DEFAULT_RETRY_POLICY, RetryPolicy

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "BatcherStats",
    "EventBatcher",
]

logger = logging.getLogger("personalize_middleware.events")

DEFAULT_MAX_QUEUE = 10_000
DEFAULT_MAX_ELEMENTS = 100
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_MAX_RETRIES = 8
DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 5.0

_Pair = tuple[str, EventAction]


@dataclass(slots=True)
class BatcherStats:
    """Counters in actions (one impression or click each); ``dropped`` is the sum of the
    ``dropped_*`` reasons."""

    queued: int = 0
    sent: int = 0
    retried: int = 0
    calls: int = 0
    failed_calls: int = 0
    dropped_overflow: int = 0
    dropped_rejected: int = 0
    dropped_failed: int = 0
    dropped_shutdown: int = 0

    @property
    def dropped(self) -> int:
        return (
            self.dropped_overflow
            + self.dropped_rejected
            + self.dropped_failed
            + self.dropped_shutdown
        )


class EventBatcher:
    """Batches event actions per user and delivers them through ``backend.track_events``.

    ``enqueue`` is synchronous and never blocks; ``start`` / ``aclose`` run the sender.
    """

    def __init__(
        self,
        backend: PersonalizeBackend,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_retries: int = DEFAULT_MAX_RETRIES,
        policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        backoff_initial: float | None = None,
        backoff_max: float | None = None,
        auth_pause: float | None = None,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        if not 1 <= max_elements <= 100:
            raise ConfigurationError("max_elements must be 1..100", field="max_elements")
        if max_queue < 1 or max_retries < 0:
            raise ConfigurationError("max_queue must be >= 1, max_retries >= 0", field="max_queue")
        for name, value in (
            ("flush_interval", flush_interval),
            ("call_timeout", call_timeout),
            ("shutdown_timeout", shutdown_timeout),
        ):
            positive_number(name, value)
        self.backend = backend
        self.max_queue = max_queue
        self.max_elements = max_elements
        self.flush_interval = flush_interval
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
        self._queue: deque[_Pair] = deque()
        self._first_at = 0.0
        self._inflight = 0
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
        return f"EventBatcher(pending={self.pending}, stats={self.stats})"

    @property
    def state(self) -> Lifecycle:
        """``NEW`` until started, ``RUNNING``, ``CLOSING`` while ``aclose`` flushes, ``CLOSED``."""
        return self._state

    @property
    def pending(self) -> int:
        """Actions queued or being delivered."""
        return len(self._queue) + self._inflight

    # -- producing ---------------------------------------------------------------------------

    def enqueue(self, customer_id: str, action: EventAction) -> bool:
        """Queue one action for ``customer_id``; ``False`` when it was dropped (queue
        full, or the batcher is closed)."""
        if self._closing or len(self._queue) >= self.max_queue:
            self.stats.dropped_overflow += 1
            self._log.warning(
                "overflow",
                "personalize: event queue %s (%d actions); event dropped",
                "closed" if self._closing else "full",
                len(self._queue),
            )
            return False
        if not self._queue:
            self._first_at = time.monotonic()
            self._wake.set()
        self._queue.append((customer_id, action))
        self._idle.clear()
        self.stats.queued += 1
        if len(self._queue) >= self.max_elements:
            self._wake.set()
        return True

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the sender task (idempotent; a closed batcher can be started again)."""
        if self._task is not None:
            return
        # Fresh events, bound to the running loop (a test client may run a new loop for
        # every lifespan).
        self._wake, self._stop, self._idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._closing = self._closed = False
        self._deadline = float("inf")
        if self._queue:
            self._wake.set()
        else:
            self._idle.set()
        self._task = asyncio.create_task(self._run(), name="personalize-event-batcher")
        self._state = Lifecycle.RUNNING

    async def flush(self) -> None:
        """Send everything queued now and wait until it is delivered or dropped."""
        if self._task is None:
            await self.start()
        self._flush_requested = True
        self._wake.set()
        await self._idle.wait()

    async def aclose(self, timeout: float | None = None) -> None:
        """Deliver what is queued within ``timeout`` seconds (``shutdown_timeout`` by
        default), then stop; what is left is counted as ``dropped_shutdown``."""
        if self._closed:
            return
        self._closed = True
        self._state = Lifecycle.CLOSING
        timeout = self.shutdown_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + timeout
        self._closing = True
        self._wake.set()
        self._stop.set()
        task, self._task = self._task, None
        if task is None and self._queue:
            task = asyncio.create_task(self._run())
        cut_short = 0
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=max(timeout, 0) + 0.05)
            if not done:
                cut_short = self._inflight  # the sender's `finally` zeroes it when cancelled
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        left = len(self._queue) + max(self._inflight, cut_short)
        if left:
            self.stats.dropped_shutdown += left
            logger.error(
                "personalize: %d tracking events not delivered before shutdown (deadline %.1fs)",
                left,
                timeout,
            )
        self._queue.clear()
        self._inflight = 0
        self._idle.set()
        self._state = Lifecycle.CLOSED

    def reset_after_fork(self) -> None:
        """In a forked child (``_fork``): the sender task and its events are the parent's
        loop's and never run here; the child starts its own. Events the parent queued are
        the parent's to deliver: sending them from every child too would duplicate them."""
        if self._task is None and not self._queue:
            return
        abandon((self._task, self._wake, self._stop, self._idle))
        self._task = None
        self._queue.clear()
        self._inflight = 0
        self._wake, self._stop, self._idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._closing = self._closed = False
        self._state = Lifecycle.NEW

    # -- the sender --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._flush_requested = False
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._wait_for_batch()
            pairs = self._take()
            self._inflight = len(pairs)
            try:
                await self._deliver(pairs)
            finally:
                self._inflight = 0

    async def _wait_for_batch(self) -> None:
        """Until a full batch is waiting, the interval since the first event ran out, or a
        flush / shutdown asks for everything now."""
        while len(self._queue) < self.max_elements and not (self._flush_requested or self._closing):
            remaining = self._first_at + self.flush_interval - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _take(self) -> list[_Pair]:
        """Oldest actions first, as many as fit in ``max_elements`` distinct users."""
        users: set[str] = set()
        pairs: list[_Pair] = []
        while self._queue:
            customer_id = self._queue[0][0]
            if customer_id not in users and len(users) >= self.max_elements:
                break
            users.add(customer_id)
            pairs.append(self._queue.popleft())
        self._first_at = time.monotonic()
        return pairs

    async def _deliver(self, pairs: list[_Pair], splits: list[int] | None = None) -> None:
        """Deliver ``pairs``. ``splits`` is what is left of the batch's budget of 400
        splits (shared by the halves, so a 400 for everything cannot become a storm)."""
        if splits is None:
            splits = [2 * math.ceil(math.log2(len(pairs) + 1)) + 2]
        attempt = 0
        while True:
            try:
                await self._call(pairs)
            except BadRequestError as exc:
                await self._isolate(pairs, exc, splits)
                return
            except AuthenticationError:
                logger.error(
                    "personalize: the events API refused the credentials (401); %d events "
                    "kept, next try in %.0fs. Check the workspace id and the Personalize "
                    "API secret (regenerating it invalidates the old one).",
                    len(pairs),
                    self.policy.auth_pause,
                )
                if not await self._pause(self.policy.auth_pause):
                    return self._drop(pairs, "failed", "shutdown during the 401 pause")
                continue
            except (APIError, TimeoutError) as exc:
                retryable = isinstance(exc, TimeoutError) or exc.retryable
                if not retryable:
                    return self._drop(pairs, "failed", f"not retryable: {exc}")
                attempt += 1
                if attempt > self.max_retries:
                    return self._drop(pairs, "failed", f"gave up after {attempt} tries: {exc}")
                self.stats.retried += len(pairs)
                if not await self._pause(self.policy.backoff(attempt, exc)):
                    return self._drop(pairs, "shutdown", "shutdown deadline during retries")
                continue
            except Exception as exc:
                logger.exception("personalize: events delivery failed unexpectedly")
                return self._drop(pairs, "failed", f"unexpected {type(exc).__name__}")
            self.stats.sent += len(pairs)
            return

    async def _call(self, pairs: list[_Pair]) -> None:
        elements = _group(pairs)
        self.stats.calls += 1
        try:
            async with asyncio.timeout(self.call_timeout):
                await self.backend.track_events(elements)
        except BaseException:
            self.stats.failed_calls += 1
            raise

    async def _isolate(self, pairs: list[_Pair], exc: BadRequestError, splits: list[int]) -> None:
        """A 400 names no element: split until the refused action is alone, drop it."""
        if len(pairs) > 1 and splits[0] <= 0:
            self.stats.dropped_rejected += len(pairs)
            logger.error(
                "personalize: the events API refuses (400) most of a batch: %s; %d events "
                "dropped without isolating further (check MOE-APPKEY / the workspace id)",
                exc.description or exc.title or exc,
                len(pairs),
            )
            return
        if len(pairs) == 1:
            action = pairs[0][1]
            logger.warning(
                "personalize: the events API refused an action (%s %s, experience %r): %s; dropped",
                action.get("action"),
                action.get("moe_event_uuid"),
                str(action.get("attributes", {}).get("experience", ""))[:100],
                exc.description or exc.title or exc,
            )
            self.stats.dropped_rejected += 1
            return
        splits[0] -= 1
        middle = len(pairs) // 2
        await self._deliver(pairs[:middle], splits)
        await self._deliver(pairs[middle:], splits)

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

    def _drop(self, pairs: Sequence[_Pair], reason: str, detail: str) -> None:
        if reason == "shutdown":
            self.stats.dropped_shutdown += len(pairs)
        else:
            self.stats.dropped_failed += len(pairs)
        logger.error("personalize: %d tracking events dropped (%s)", len(pairs), detail)


def _group(pairs: Sequence[_Pair]) -> list[EventElement]:
    elements: dict[str, EventElement] = {}
    for customer_id, action in pairs:
        element = elements.get(customer_id)
        if element is None:
            elements[customer_id] = element = {"customer_id": customer_id, "actions": []}
        element["actions"].append(action)
    return list(elements.values())
