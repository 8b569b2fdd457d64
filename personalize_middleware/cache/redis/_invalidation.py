"""Invalidating an identity in L2: a new generation, and word to the other processes.

``INVALIDATE_SCRIPT`` (``_codec.py``) deletes the identity's entries, starts its next
generation and publishes the invalidation on the workspace channel, in one atomic step: a
fetch that began under the old generation can no longer write (``SET_SCRIPT`` refuses it),
and the other processes drop their L1 copies (``_broadcast.py``). An invalidation Redis
could not take is kept and replayed when Redis answers again.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from ._broadcast import Broadcast
from ._connection import RedisConnection, Unavailable
from ._keys import KeyNames

__all__ = ["Invalidations"]

_PENDING_INVALIDATIONS = 10_000


class Invalidations:
    """The invalidations of one layer (``scripts`` is the layer's, filled on connect)."""

    def __init__(
        self,
        conn: RedisConnection,
        names: KeyNames,
        scripts: dict[str, Any],
        broadcast: Broadcast,
        retention: Callable[[], float],
    ) -> None:
        self._conn = conn
        self._names = names
        self._scripts = scripts
        self._broadcast = broadcast
        self._retention = retention
        self.pending: deque[str] = deque(maxlen=_PENDING_INVALIDATIONS)

    async def invalidate(self, digest: str) -> None:
        """Invalidate the identity with this digest, now or when Redis is back."""
        if not await self._run(digest):
            self.pending.append(digest)

    async def replay(self) -> None:
        """The invalidations Redis missed, in order, until one fails again."""
        while self.pending:
            digest = self.pending.popleft()
            if not await self._run(digest):
                self.pending.appendleft(digest)
                return

    async def _run(self, digest: str) -> bool:
        key = self._names.data(digest)
        args = [
            max(1, math.ceil(self._retention() * 1000)),
            self._names.channel,
            self._broadcast.message("invalidate", id=digest),
        ]
        try:
            await self._conn.run(
                "invalidate", lambda c: self._scripts["invalidate"](keys=[key], args=args)
            )
        except Unavailable:
            return False
        return True
