"""The per-request personalization handle: ``request.state.personalize``."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ._interfaces import TrackingHooks
from ._models import Experience, FetchQuery, Identity

if TYPE_CHECKING:
    from .cache import ClientKey, ExperienceStore

__all__ = ["Personalization", "current_personalization"]

current_personalization: ContextVar[Personalization | None] = ContextVar(
    "personalize_current", default=None
)

_MISSING: Any = object()


class Personalization:
    """What one request gets from MoEngage.

    Created by ``PersonalizeMiddleware`` for every HTTP request and stored in
    ``scope["state"]["personalize"]`` (``request.state.personalize``). The route's keys are
    already being fetched when the handler runs; reading them is synchronous
    (``experience``, ``value``) or waits at most the latency budget (``get``, ``wait``).
    """

    __slots__ = (
        "_active_keys",
        "_client",
        "_deadline",
        "_futures",
        "_identity",
        "_identity_factory",
        "_query",
        "_render_id",
        "_resolved",
        "_store",
        "attributes",
        "budget",
        "keys",
        "tracking",
        "tracking_state",
        "used",
    )

    def __init__(
        self,
        *,
        store: ExperienceStore,
        keys: tuple[str, ...],
        attributes: Mapping[str, str],
        budget: float,
        identity_factory: Callable[[], Awaitable[Identity]],
        tracking: TrackingHooks | None = None,
        active_keys: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None,
        client: ClientKey | None = None,
    ) -> None:
        self._store = store
        #: The requesting address for the per-client fetch limits, worked out on a miss.
        self._client = client
        self.keys = keys
        self.attributes = attributes
        self.budget = budget
        self._identity_factory = identity_factory
        self._identity: Identity | None = None
        self._query: FetchQuery | None = None
        self._resolved: dict[str, Experience | None] = {}
        self._futures: dict[str, asyncio.Future[Experience | None]] = {}
        self._deadline = time.monotonic() + budget
        self._render_id: str | None = None
        self._active_keys = active_keys
        #: Per-page-view parts the tracking hooks compute once (theirs; opaque here).
        self.tracking_state: Any = None
        self.tracking = tracking
        self.used = bool(keys)

    # -- lifecycle (called by the middleware) -----------------------------------------------

    async def start(self) -> None:
        """Resolve the identity and start fetching the route's keys (never raises)."""
        if self.keys:
            await self._request(self.keys)

    async def resolve_identity(self) -> Identity:
        if self._identity is None:
            self._identity = await self._identity_factory()
        return self._identity

    async def _query_for_identity(self) -> FetchQuery:
        if self._query is None:
            self._query = FetchQuery(await self.resolve_identity(), self.attributes)
        return self._query

    async def _request(self, keys: tuple[str, ...] | list[str]) -> None:
        wanted = [k for k in keys if k not in self._resolved and k not in self._futures]
        if not wanted:
            return
        if self._active_keys is not None:
            live = set(self._active_keys(tuple(wanted)))
            for key in wanted:
                if key not in live:
                    self._resolved[key] = None  # not Active in the workspace: default
            wanted = [k for k in wanted if k in live]
            if not wanted:
                return
        query = await self._query_for_identity()
        found, missing = self._store.lookup(query, wanted, self._client)
        self._resolved.update(found)
        if missing:
            self._futures.update(self._store.start_fetch(query, missing, self._client))

    # -- reading ---------------------------------------------------------------------------

    @property
    def identity(self) -> Identity | None:
        """The resolved identity (``None`` until resolved; route keys resolve it early)."""
        return self._identity

    @property
    def render_id(self) -> str:
        """A random id for this page view, bound into tracking tokens."""
        if self._render_id is None:
            self._render_id = secrets.token_urlsafe(12)
        return self._render_id

    @property
    def pending(self) -> bool:
        """True while some requested key has no answer yet."""
        self._collect()
        return bool(self._futures)

    def _collect(self) -> None:
        if self._futures:
            for key, future in list(self._futures.items()):
                if future.done():
                    self._resolved[key] = future.result()
                    del self._futures[key]

    def experience(self, key: str) -> Experience | None:
        """The experience for ``key`` if it is here now, else ``None`` (no waiting)."""
        self.used = True
        found = self._resolved.get(key, _MISSING)
        if found is _MISSING:
            self._collect()
            found = self._resolved.get(key)
        return found  # type: ignore[no-any-return]

    def value(self, key: str, name: str, default: Any = None) -> Any:
        """Payload variable ``name`` of experience ``key``, or ``default``."""
        experience = self.experience(key)
        return default if experience is None else experience.get(name, default)

    @property
    def experiences(self) -> Mapping[str, Experience]:
        """Every experience resolved so far (matched keys only)."""
        self.used = True
        self._collect()
        return {k: v for k, v in self._resolved.items() if v is not None}

    async def wait(self) -> None:
        """Wait for keys in flight, at most until the latency budget (from the request's
        start) runs out. Late answers still fill the cache for the next request."""
        self._collect()
        if not self._futures:
            return
        remaining = self._deadline - time.monotonic()
        if remaining > 0:
            await asyncio.wait(list(self._futures.values()), timeout=remaining)
        self._collect()
        if self._futures and self._query is not None:
            # Budget spent and the upstream still silent: serve what stale-if-error holds
            # rather than the defaults (the fetch goes on and fills the cache).
            for key, experience in self._store.stale(self._query, list(self._futures)).items():
                self._resolved[key] = experience
                del self._futures[key]

    async def get(self, key: str) -> Experience | None:
        """The experience for ``key``, fetching it now if the route did not ask for it
        (within the budget; ``None`` means render the default)."""
        self.used = True
        await self._request((key,))
        await self.wait()
        return self._resolved.get(key)

    async def get_many(self, *keys: str) -> dict[str, Experience]:
        """Several keys at once: the missing ones go out in ONE call."""
        self.used = True
        await self._request(keys)
        await self.wait()
        return {k: e for k in keys if (e := self._resolved.get(k)) is not None}

    async def invalidate(self, *others: Identity) -> None:
        """Forget what is cached for this request's identity and for ``others`` (call it
        on login and logout, passing the identity the user becomes)."""
        identity = await self.resolve_identity()
        await self._store.invalidate(identity)
        for other in others:
            await self._store.invalidate(other)
