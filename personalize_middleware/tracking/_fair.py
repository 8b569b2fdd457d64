"""``FairBuffer``: the entries a batcher holds, by visitor, and the batches it makes of them.

A batch is bounded by users (the API takes at most 100 elements a call) *and* by bytes
(the API refuses a body that is too large with 413). It is filled round-robin: one action
of each visitor in turn, so a visitor with thousands of actions waiting cannot push the
others out of a call; a visitor served moves behind the ones still waiting.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

from .._interfaces import OutboxEntry
from .._models import EventElement
from ._outbox import action_size

__all__ = ["BODY_OVERHEAD", "FairBuffer", "body_size", "element_overhead", "group"]

#: ``{"elements":[`` and ``]}``.
BODY_OVERHEAD = len('{"elements":[]}')


def element_overhead(customer_id: str) -> int:
    """Bytes of ``{"customer_id":"..","actions":[]},`` around a visitor's actions."""
    quoted = json.dumps(customer_id, ensure_ascii=False).encode()
    return len('{"customer_id":,"actions":[]},') + len(quoted)


def size_of(entry: OutboxEntry) -> int:
    if entry.size < 0:
        entry.size = action_size(entry.action)
    return entry.size


def body_size(entries: Sequence[OutboxEntry]) -> int:
    """An upper bound of the JSON body of one events call carrying ``entries``."""
    seen: set[str] = set()
    total = BODY_OVERHEAD
    for entry in entries:
        if entry.customer_id not in seen:
            seen.add(entry.customer_id)
            total += element_overhead(entry.customer_id)
        total += size_of(entry) + 1
    return total


def group(entries: Iterable[OutboxEntry]) -> list[EventElement]:
    """One element per visitor, the actions in the order given."""
    elements: dict[str, EventElement] = {}
    for entry in entries:
        element = elements.get(entry.customer_id)
        if element is None:
            elements[entry.customer_id] = element = {
                "customer_id": entry.customer_id,
                "actions": [],
            }
        element["actions"].append(entry.action)
    return list(elements.values())


class FairBuffer:
    """Entries by visitor, in the order the visitors' oldest entries arrived."""

    def __init__(self) -> None:
        self._by_visitor: OrderedDict[str, deque[OutboxEntry]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def visitors(self) -> int:
        return len(self._by_visitor)

    def add(self, entries: Iterable[OutboxEntry]) -> None:
        by_visitor = self._by_visitor
        for entry in entries:
            queue = by_visitor.get(entry.customer_id)
            if queue is None:
                by_visitor[entry.customer_id] = queue = deque()
            queue.append(entry)
            self._count += 1

    def oldest(self) -> float:
        """``enqueued_at`` of the oldest entry (``inf`` when empty)."""
        return min((queue[0].enqueued_at for queue in self._by_visitor.values()), default=1e300)

    def next_batch(self, max_users: int, max_bytes: int) -> list[OutboxEntry]:
        """Take one call's worth: round-robin over the first ``max_users`` visitors, one
        action each per turn, until the body would exceed ``max_bytes``. An action too big
        to share a call goes alone."""
        budget = max_bytes - BODY_OVERHEAD
        batch: list[OutboxEntry] = []
        served: list[str] = []
        seen: set[str] = set()
        active = _first(self._by_visitor.items(), max_users)
        full = False
        while active and not full:
            still: list[tuple[str, deque[OutboxEntry]]] = []
            for customer_id, queue in active:
                entry = queue[0]
                first = customer_id not in seen
                cost = size_of(entry) + 1 + (element_overhead(customer_id) if first else 0)
                if cost > budget and batch:
                    full = True
                    break
                budget -= cost
                batch.append(queue.popleft())
                if first:
                    served.append(customer_id)
                    seen.add(customer_id)
                if queue:
                    still.append((customer_id, queue))
            active = still
        self._count -= len(batch)
        for customer_id in served:
            if self._by_visitor[customer_id]:
                self._by_visitor.move_to_end(customer_id)  # behind those still waiting
            else:
                del self._by_visitor[customer_id]
        return batch

    def drain(self) -> list[OutboxEntry]:
        """Everything held, oldest visitor first."""
        entries = [entry for queue in self._by_visitor.values() for entry in queue]
        self._by_visitor.clear()
        self._count = 0
        return entries


def _first(
    items: Iterable[tuple[str, deque[OutboxEntry]]], count: int
) -> list[tuple[str, deque[OutboxEntry]]]:
    out: list[tuple[str, deque[OutboxEntry]]] = []
    for item in items:
        if len(out) >= count:
            break
        out.append(item)
    return out
