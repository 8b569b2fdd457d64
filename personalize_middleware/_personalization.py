"""The per-request personalization handle: ``request.state.personalize``."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from ._decisions import (
    CACHE,
    DEFAULT,
    NETWORK,
    NO_MATCH,
    NOT_ACTIVE,
    PENDING,
    PREVIEW,
    STALE,
    TIMEOUT,
    UNKNOWN_KEY,
    Decision,
    decision_from_entry,
)
from ._interfaces import PageTools, TrackingHooks
from ._models import CachedExperience, Experience, FetchQuery, Identity

if TYPE_CHECKING:
    from ._grants import PreviewGrant
    from .cache import ClientKey, ExperienceStore
    from .telemetry import PageObserver

__all__ = ["Personalization", "current_personalization"]

current_personalization: ContextVar[Personalization | None] = ContextVar(
    "personalize_current", default=None
)

_MISSING: Any = object()
_NOT_ACTIVE = Decision(DEFAULT, NOT_ACTIVE)
_UNKNOWN_KEY = Decision(DEFAULT, UNKNOWN_KEY)
_TIMED_OUT = Decision(DEFAULT, TIMEOUT)
_PENDING = Decision(PENDING)


class Personalization:
    """What one request gets from MoEngage.

    Created by ``PersonalizeMiddleware`` for every HTTP request and stored in
    ``scope["state"]["personalize"]`` (``request.state.personalize``). The route's keys are
    already being fetched when the handler runs; reading them is synchronous
    (``experience``, ``value``) or waits at most the latency budget (``get``, ``wait``).
    ``why(key)`` tells where each answer came from and why (``Decision``).
    """

    __slots__ = (
        "_active_keys",
        "_client",
        "_deadline",
        "_fetch_off",
        "_futures",
        "_identity",
        "_identity_factory",
        "_key_status",
        "_observer",
        "_query",
        "_render_id",
        "_resolved",
        "_store",
        "_waited",
        "_why",
        "attributes",
        "budget",
        "devtools",
        "keys",
        "tracking",
        "tracking_state",
        "used",
        "user_agent",
    )

    def __init__(
        self,
        *,
        store: ExperienceStore,
        keys: tuple[str, ...],
        attributes: Mapping[str, str],
        budget: float,
        identity_factory: Callable[[], Awaitable[Identity]] | None = None,
        tracking: TrackingHooks | None = None,
        active_keys: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None,
        user_agent: str | None = None,
        fetch: bool = True,
        key_status: Callable[[str], str | None] | None = None,
        devtools: PageTools | None = None,
        observer: PageObserver | None = None,
        client: ClientKey | None = None,
        query: FetchQuery | None = None,
    ) -> None:
        self._store = store
        #: The requesting address for the per-client fetch limits, worked out on a miss.
        self._client = client
        self.keys = keys
        self.attributes = attributes
        self.budget = budget
        if identity_factory is None and query is None:
            raise TypeError("Personalization needs an identity_factory or a query")
        self._identity_factory = identity_factory
        #: Given a ``query`` (the middleware's fast path), the identity is known already.
        self._identity: Identity | None = query.identity if query is not None else None
        self._query: FetchQuery | None = query
        self._resolved: dict[str, Experience | None] = {}
        self._futures: dict[str, asyncio.Future[Experience | None]] = {}
        self._deadline = time.monotonic() + budget
        self._render_id: str | None = None
        self._active_keys = active_keys
        self._key_status = key_status
        # Per key: the Decision, or the fresh L1 entry it is made from when asked for.
        self._why: dict[str, Decision | CachedExperience] = {}
        self._waited = 0.0
        #: The request's developer tools (preview, overlay, Server-Timing), else ``None``.
        self.devtools = devtools
        #: Per-page-view parts the tracking hooks compute once (theirs; opaque here).
        self.tracking_state: Any = None
        self.tracking = tracking
        #: True once the page depends on the visitor (route keys, an experience read, the
        #: identity or the render id asked for): the middleware then makes it private.
        self.used = bool(keys)
        #: The request's User-Agent (crawlers are not tracked; see ``tracking.is_bot``).
        self.user_agent = user_agent
        self._fetch_off = not fetch  # e.g. a crawler served the defaults
        self._observer = observer

    # -- lifecycle (called by the middleware) -----------------------------------------------

    async def start(self) -> None:
        """Resolve the identity and start fetching the route's keys (never raises)."""
        if self.keys:
            if self._observer is None:
                await self._request(self.keys)
            else:
                with self._observer.activate():  # the page's trace is the fetches' parent
                    await self._request(self.keys)

    def begin(self) -> None:
        """``start`` for a handle made with its ``query``: synchronous (a cache hit never
        yields to the event loop)."""
        query = self._query
        assert query is not None, "begin() needs the query given to the constructor"
        if self.keys:
            if self._observer is None:
                self._lookup(query, self._wanted(self.keys))
            else:
                with self._observer.activate():
                    self._lookup(query, self._wanted(self.keys))

    def end_request(self, scope_free: Callable[[], Awaitable[Identity]] | None) -> None:
        """The request is over: drop what refers to its ASGI scope (the scope refers to
        this handle through ``scope["state"]``: a reference cycle otherwise, left to the
        cyclic GC on every request). ``scope_free`` resolves the identity without the
        scope, for a handle read after its request without having resolved it."""
        self._client = None
        self._identity_factory = None if self._identity is not None else scope_free

    async def resolve_identity(self) -> Identity:
        """Who this request is (the visitor cookie is issued if there was none). A page
        that asks is personal: its response is made private like one that read
        experiences."""
        self.used = True
        if self._identity is None:
            if self._identity_factory is None:
                raise RuntimeError("personalize: the identity of a finished request is unknown")
            self._identity = await self._identity_factory()
        return self._identity

    async def _query_for_identity(self) -> FetchQuery:
        if self._query is None:
            self._query = FetchQuery(await self.resolve_identity(), self.attributes)
        return self._query

    async def _request(self, keys: tuple[str, ...] | list[str]) -> None:
        wanted = self._wanted(keys)
        if wanted:
            self._lookup(await self._query_for_identity(), wanted)

    def _wanted(self, keys: tuple[str, ...] | list[str]) -> list[str]:
        """The keys to look up: not answered or asked yet, fetched, Active (the others
        are answered here with the default)."""
        wanted = [k for k in keys if k not in self._resolved and k not in self._futures]
        if not wanted:
            return wanted
        if self._fetch_off:
            self._resolved.update(dict.fromkeys(wanted))  # the defaults, without a call
            return []
        if self._active_keys is not None:
            asked = tuple(wanted)
            active = self._active_keys(asked)
            if len(active) == len(asked):  # all Active (the usual case)
                return wanted
            live = set(active)
            for key in wanted:
                if key not in live:
                    self._resolved[key] = None  # not Active in the workspace: default
                    status = self._key_status(key) if self._key_status is not None else ""
                    self._why[key] = _UNKNOWN_KEY if status is None else _NOT_ACTIVE
            if self._observer is not None:
                self._observer.disabled(k for k in wanted if k not in live)
            wanted = [k for k in wanted if k in live]
        return wanted

    def _lookup(self, query: FetchQuery, wanted: list[str]) -> None:
        if not wanted:
            return
        found, missing = self._store.lookup(query, wanted, self._why, self._client)
        if self._observer is not None:
            self._observer.looked_up(query, found)
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
        """A random id for this page view, bound into tracking tokens (a page showing it
        is private: one id shared by many visitors would merge their events)."""
        self.used = True
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
                    self._resolved[key] = result = future.result()
                    self._why[key] = getattr(future, "decision", None) or (
                        Decision(NETWORK) if result is not None else Decision(DEFAULT, NO_MATCH)
                    )
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
            if self._observer is not None:
                self.finish_observing()
            return
        started = time.monotonic()
        remaining = self._deadline - started
        if remaining > 0:
            await asyncio.wait(list(self._futures.values()), timeout=remaining)
            self._waited += time.monotonic() - started
        self._collect()
        if self._futures and self._query is not None:
            # Budget spent and the upstream still silent: serve what stale-if-error holds
            # rather than the defaults (the fetch goes on and fills the cache).
            now = self._store.clock()
            stale = self._store.stale_entries(self._query, list(self._futures))
            for key, entry in stale.items():
                self._resolved[key] = entry.experience
                self._why[key] = decision_from_entry(entry, STALE, TIMEOUT, now)
                del self._futures[key]
        if self._observer is not None:
            self.finish_observing()

    def finish_observing(self) -> None:
        """Hand this page's outcomes to its telemetry (once: when the wait completes or
        the response starts, whichever is first)."""
        observer, self._observer = self._observer, None
        if observer is not None:
            self._collect()
            budget_spent = time.monotonic() >= self._deadline
            observer.finish(self._query, self._resolved, tuple(self._futures), budget_spent)

    # -- why -------------------------------------------------------------------------------

    def why(self, key: str) -> Decision | None:
        """Where this request's answer for ``key`` came from and why (see ``Decision``);
        ``None`` for a key this request never asked for."""
        found = self._why.get(key)
        if found is None:
            self._collect()
            found = self._why.get(key)
            if found is None:
                if key not in self._futures:
                    return None
                return _TIMED_OUT if time.monotonic() >= self._deadline else _PENDING
        if isinstance(found, CachedExperience):
            found = decision_from_entry(found, CACHE, None, self._store.clock())
        assert isinstance(found, Decision)
        if found.reason is None and self.devtools is not None and self.devtools.preview:
            return Decision(found.source, PREVIEW, found.age, found.fetch_ms)
        return found

    @property
    def decisions(self) -> dict[str, Decision]:
        """``why`` for every key this request asked for: the route's first, in its order,
        then the ones asked for later."""
        self._collect()
        keys = dict.fromkeys([*self.keys, *self._resolved, *self._futures])
        return {key: decision for key in keys if (decision := self.why(key)) is not None}

    @property
    def sources(self) -> str:
        """Where this request's answers came from, each source once, in order, a default or
        stale one with its reason: ``cache+default:timeout`` (the ``Server-Timing``
        description; cheaper than ``decisions``: no ``Decision`` is made)."""
        self._collect()
        seen: dict[str, None] = {}
        for found in self._why.values():
            if isinstance(found, CachedExperience):
                seen["cache" if found.experience is not None else "default:no_match"] = None
            else:
                assert isinstance(found, Decision)
                reason = found.reason
                label = found.source if reason in (None, PREVIEW) else f"{found.source}:{reason}"
                seen[label] = None
        if self._futures:
            seen["default:timeout" if time.monotonic() >= self._deadline else PENDING] = None
        return "+".join(seen)

    @property
    def waited_ms(self) -> float:
        """How long this request waited for experiences (ms): what personalization cost
        the page beyond the work that overlapped the handler."""
        return self._waited * 1000

    @property
    def preview(self) -> PreviewGrant | None:
        """The preview this request renders (a signed preview link), else ``None``: the
        experiences are those of the preview's customer or audience."""
        return self.devtools.preview if self.devtools is not None else None

    @property
    def script_hashes(self) -> tuple[str, ...]:
        """``sha256-...`` of each script ``personalize_script()`` adds to this page (the
        tracking script, the debug overlay's), for a CSP ``script-src``."""
        found = getattr(self.tracking, "script_hash", None)
        hashes = (found,) if isinstance(found, str) else ()
        return hashes + self.devtools.script_hashes if self.devtools is not None else hashes

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
