"""The store's fetches in flight: who joins which, and which were overtaken by an
invalidation.

Each fetch task is a ``Flight``: its query and one future per key. A request missing a key
joins the future in flight for (identity, context, key), if any. Invalidating an identity
``detach``es its flights: they still resolve their waiters (requests made before the
invalidation), but they are marked ``invalidated`` and so write nothing to the cache, and
no later request joins them: it starts a fetch of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .._models import Experience, FetchQuery

__all__ = ["Flight", "Flights"]

_Future = asyncio.Future[Experience | None]


class Flight:
    """One fetch task."""

    __slots__ = ("futures", "invalidated", "query")

    def __init__(self, query: FetchQuery, futures: dict[str, _Future]) -> None:
        self.query = query
        self.futures = futures
        self.invalidated = False


class Flights:
    """The flights of one store, by (identity digest, context, key) and by identity."""

    __slots__ = ("_by_identity", "_futures")

    def __init__(self) -> None:
        self._futures: dict[tuple[str, Any, str], _Future] = {}
        self._by_identity: dict[str, set[Flight]] = {}

    def future(self, query: FetchQuery, key: str) -> _Future | None:
        """The future of ``key`` in flight for this query, to join."""
        return self._futures.get((query.identity_hash, query.context_key, key))

    def add(self, flight: Flight) -> None:
        ident, ctx = flight.query.identity_hash, flight.query.context_key
        for key, future in flight.futures.items():
            self._futures[(ident, ctx, key)] = future
        self._by_identity.setdefault(ident, set()).add(flight)

    def _unlink(self, flight: Flight) -> None:
        ident, ctx = flight.query.identity_hash, flight.query.context_key
        for key, future in flight.futures.items():
            if self._futures.get((ident, ctx, key)) is future:  # not a newer flight's
                del self._futures[(ident, ctx, key)]

    def finish(self, flight: Flight) -> None:
        """``flight`` is done: nobody joins it any more."""
        self._unlink(flight)
        flights = self._by_identity.get(flight.query.identity_hash)
        if flights is not None:
            flights.discard(flight)
            if not flights:
                del self._by_identity[flight.query.identity_hash]

    def detach(self, identity_digest: str) -> None:
        """The identity was invalidated: its flights write nothing and are joined no more."""
        for flight in self._by_identity.pop(identity_digest, ()):
            flight.invalidated = True
            self._unlink(flight)
