"""The event outbox: where accepted events wait until MoEngage has accepted them.

Three implementations of ``EventOutbox`` (the protocol is in ``_interfaces``):

===================  ===========================================================================
``MemoryOutbox``     the default: a bounded in-process queue, lost with the process (fine
                     for development and for one process that is never killed mid-outage)
``SQLiteOutbox``     a local file (``_outbox_sqlite``): survives a crash, a SIGKILL or a
                     deploy; a restarted process resumes it, several processes on one
                     machine may share it
``RedisOutbox``      a Redis stream per workspace with a consumer group (``_outbox_redis``):
                     any process delivers, a dead process's entries are taken over
===================  ===========================================================================

Every outbox is bounded by size (``max_queue`` actions, ``max_per_visitor`` per visitor, so
one visitor's flood cannot fill it for everyone); age is bounded by the batcher
(``max_event_age``). ``_outbox_choice.outbox_from_settings`` picks one from the settings.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .._config import positive_int
from .._interfaces import OutboxEntry, PutResult
from .._models import EventAction

__all__ = [
    "DEFAULT_MAX_DURABLE_QUEUE",
    "DEFAULT_MAX_PER_VISITOR",
    "DEFAULT_MAX_QUEUE",
    "GroupCommit",
    "MemoryOutbox",
    "action_size",
    "decode_entry",
    "encode_entry",
]

#: Actions the in-memory queue holds.
DEFAULT_MAX_QUEUE = 10_000
#: Actions a durable outbox holds (~500 bytes each: about 100 MB at most).
DEFAULT_MAX_DURABLE_QUEUE = 200_000
#: Actions one visitor may have waiting: a bot's flood is cut here, others still fit.
DEFAULT_MAX_PER_VISITOR = 1_000


def action_size(action: EventAction) -> int:
    """Bytes ``action`` takes in the events call's JSON body (as the client writes it)."""
    return len(_dumps(action))


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_entry(customer_id: str, action: EventAction, now: float) -> tuple[bytes, int]:
    """The stored form of one action and its size in the events body."""
    body = _dumps(action)
    head = _dumps({"c": customer_id, "t": now})
    # {"c":..,"t":..,"a":<action>}: the action's bytes are written once, not re-encoded.
    return head[:-1] + b',"a":' + body + b"}", len(body)


def decode_entry(key: str, raw: bytes | str) -> OutboxEntry | None:
    """An entry from its stored form; ``None`` for anything that is not one."""
    try:
        data = json.loads(raw)
        customer_id, action, when = data["c"], data["a"], data["t"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if not isinstance(customer_id, str) or not isinstance(action, dict):
        return None
    if not isinstance(when, int | float):
        return None
    return OutboxEntry(key, customer_id, action, -1, float(when))  # type: ignore[arg-type]


class MemoryOutbox:
    """The in-process outbox: a bounded queue (``max_queue`` actions, ``max_per_visitor``
    each), lost when the process ends. ``put_nowait`` is the synchronous fast path."""

    durable = False

    def __init__(
        self, *, max_queue: int = DEFAULT_MAX_QUEUE, max_per_visitor: int = DEFAULT_MAX_PER_VISITOR
    ) -> None:
        positive_int("max_queue", max_queue)
        positive_int("max_per_visitor", max_per_visitor)
        self.max_queue = max_queue
        self.max_per_visitor = max_per_visitor
        self._queue: deque[OutboxEntry] = deque()
        self._per_visitor: dict[str, int] = {}
        self._leased = 0
        self._seq = 0

    def __repr__(self) -> str:
        return f"MemoryOutbox(pending={self.pending}, max_queue={self.max_queue})"

    @property
    def pending(self) -> int:
        return len(self._queue) + self._leased

    @property
    def queued(self) -> int:
        """Entries not taken yet."""
        return len(self._queue)

    def put_nowait(self, customer_id: str, action: EventAction, now: float) -> str:
        """Queue one action: ``"stored"``, ``"full"`` or ``"flood"``."""
        if len(self._queue) + self._leased >= self.max_queue:
            return "full"
        count = self._per_visitor.get(customer_id, 0)
        if count >= self.max_per_visitor:
            return "flood"
        self._per_visitor[customer_id] = count + 1
        self._seq += 1
        self._queue.append(OutboxEntry(str(self._seq), customer_id, action, -1, now))
        return "stored"

    async def start(self) -> None:
        pass

    async def put(self, items: Sequence[tuple[str, EventAction]], now: float) -> PutResult:
        result = PutResult()
        for customer_id, action in items:
            outcome = self.put_nowait(customer_id, action, now)
            setattr(result, outcome, getattr(result, outcome) + 1)
        return result

    async def take(self, limit: int) -> list[OutboxEntry]:
        return self.take_nowait(limit)

    def take_nowait(self, limit: int) -> list[OutboxEntry]:
        queue = self._queue
        count = min(limit, len(queue))
        taken = [queue.popleft() for _ in range(count)]
        self._leased += count
        return taken

    async def ack(self, entries: Sequence[OutboxEntry]) -> None:
        self.ack_nowait(entries)

    def ack_nowait(self, entries: Sequence[OutboxEntry]) -> None:
        per_visitor = self._per_visitor
        for entry in entries:
            count = per_visitor.get(entry.customer_id, 0) - 1
            if count > 0:
                per_visitor[entry.customer_id] = count
            else:
                per_visitor.pop(entry.customer_id, None)
        self._leased = max(0, self._leased - len(entries))

    async def release(self, entries: Sequence[OutboxEntry]) -> None:
        self._leased = max(0, self._leased - len(entries))
        self._queue.extendleft(reversed(entries))

    def clear(self) -> int:
        """Forget everything (shutdown of a non-durable outbox); how many were left."""
        left = self.pending
        self._queue.clear()
        self._per_visitor.clear()
        self._leased = 0
        return left

    async def aclose(self) -> None:
        pass


Put = tuple[Sequence[tuple[str, EventAction]], float]


class GroupCommit:
    """Coalesces concurrent puts: while one write is under way, the puts that arrive
    meanwhile wait and go together in the next one (one transaction, one Redis script).
    ``write(puts)`` returns one ``PutResult`` per put, or raises for all of them."""

    def __init__(self, write: Callable[[list[Put]], Awaitable[list[PutResult]]]) -> None:
        self._write = write
        self._waiting: list[tuple[Put, asyncio.Future[PutResult]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def put(self, items: Sequence[tuple[str, EventAction]], now: float) -> PutResult:
        future: asyncio.Future[PutResult] = asyncio.get_running_loop().create_future()
        self._waiting.append(((items, now), future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())
        return await future

    async def wait(self) -> None:
        """Until the writes under way are done."""
        if self._writer is not None:
            await asyncio.wait({self._writer})

    async def _write_all(self) -> None:
        try:
            while self._waiting:
                work, self._waiting = self._waiting, []
                try:
                    results = await self._write([put for put, _ in work])
                except Exception as exc:
                    for _, future in work:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(work, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._writer = None
