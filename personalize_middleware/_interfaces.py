"""The protocols the feature packages meet at, so they depend on these and not on each
other:

``PersonalizeBackend``  what the middleware needs from MoEngage: ``upstream.PersonalizeClient``
                        or ``local.LocalBackend`` (or a test double)
``SharedLayer``         a cache and coordination layer shared by processes (``cache.redis``)
``Broadcaster``         a shared layer that also carries messages between the processes
``IdentityResolver``    who the request is for (``_identity.default_identity`` or the app's)
``TrackingHooks``       what a page view's ``Personalization`` (and the Jinja helpers) ask
                        of tracking: attributes for an element, the script tag
``EventSink``           where verified impressions and clicks go: the beacon endpoint and
                        the server-side impression hook both write to one
``TrackedEvent``        what a sink is given (a verified tracking token is one)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, runtime_checkable

from ._models import (
    CachedExperience,
    EventElement,
    Experience,
    ExperienceMetadata,
    FetchQuery,
    Identity,
)

if TYPE_CHECKING:
    from markupsafe import Markup
    from starlette.requests import HTTPConnection

__all__ = [
    "Broadcaster",
    "EventSink",
    "FetchFn",
    "IdentityResolver",
    "PageView",
    "PersonalizeBackend",
    "SharedEntries",
    "SharedLayer",
    "TrackedEvent",
    "TrackingHooks",
]

#: Resolves who a request is for; sync or async; ``None`` means "not known, anonymous".
IdentityResolver = Callable[["HTTPConnection"], "Identity | Awaitable[Identity | None] | None"]


@runtime_checkable
class PersonalizeBackend(Protocol):
    """What the middleware needs from MoEngage (or from the local engine).

    ``fetch_experiences`` returns only the keys that matched: an absent key is the API's
    "no match", not an error. Errors are ``APIError`` subclasses.
    """

    async def fetch_experiences(
        self,
        keys: Iterable[str],
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Experience]: ...

    async def fetch_metadata(
        self, statuses: Iterable[str] | None = None
    ) -> list[ExperienceMetadata]: ...

    async def track_events(self, elements: Sequence[EventElement]) -> None: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


FetchFn = Callable[[], Awaitable[dict[str, CachedExperience]]]


class SharedEntries(dict[str, CachedExperience]):
    """What ``SharedLayer.get`` may return: the entries, and the identity's
    ``generation`` when the layer keeps one (``None``: it does not). The store hands the
    generation back to ``coordinate`` and ``set``, which then share a fetch's answer only
    if the identity was not invalidated since the read."""

    __slots__ = ("generation",)

    def __init__(
        self, entries: Mapping[str, CachedExperience] | None = None, generation: str | None = None
    ) -> None:
        super().__init__(entries or {})
        self.generation = generation


class SharedLayer(Protocol):
    """A cache and coordination layer shared by processes (L2), e.g. Redis.

    Implementations never raise on their own failures (they degrade and log); ``coordinate``
    may raise the ``APIError`` of the upstream call or a ``RateLimitedError`` when the
    shared budget is spent. A layer that keeps generations returns ``SharedEntries`` from
    ``get`` and takes ``generation=`` in ``set`` and ``coordinate``; the store passes it
    only when ``get`` returned one, so a layer without generations needs neither.
    """

    async def get(self, query: FetchQuery, keys: Collection[str]) -> dict[str, CachedExperience]:
        """Whatever L2 holds for these keys, at any age."""
        ...

    async def set(
        self,
        query: FetchQuery,
        entries: Mapping[str, CachedExperience],
        retention: float,
        *,
        generation: str | None = None,
    ) -> None: ...

    async def invalidate(self, identity: Identity) -> None: ...

    async def coordinate(
        self,
        query: FetchQuery,
        keys: Collection[str],
        fetch: FetchFn,
        *,
        generation: str | None = None,
    ) -> dict[str, CachedExperience]:
        """Run ``fetch`` unless another process is already fetching the same thing (then
        wait for its result in L2), and only within the workspace's rate budget."""
        ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


#: A broadcast message: ``{"kind": "invalidate", "id": <identity digest>}`` or
#: ``{"kind": "refresh", "keys": [...] | None}`` (more fields may come).
BroadcastListener = Callable[[Mapping[str, Any]], None]


@runtime_checkable
class Broadcaster(Protocol):
    """A shared layer that tells the other processes of invalidations and refreshes."""

    def add_listener(self, listener: BroadcastListener) -> None: ...

    async def publish_refresh(self, keys: list[str] | None = None) -> int:
        """Every process refreshes its metadata (and forgets ``keys``); returns how many
        were listening."""
        ...


class TrackedEvent(Protocol):
    """One verified impression (``kind="shown"``) or click of one page view."""

    @property
    def kind(self) -> Literal["shown", "clicked"]: ...
    @property
    def key(self) -> str: ...
    @property
    def context(self) -> Mapping[str, Any]: ...
    @property
    def render_id(self) -> str: ...
    @property
    def b_id(self) -> str | None: ...


class EventSink(Protocol):
    """Takes verified events: dedupes them per page view, counts them, queues them for
    delivery. ``record`` returns ``True`` when the event was queued (new and deliverable)."""

    def record(self, identity: Identity, event: TrackedEvent, now: float) -> bool: ...


class PageView(Protocol):
    """What tracking reads of a page view (a ``Personalization`` is one). ``tracking_state``
    is a slot the tracking hooks own: per-page-view parts they compute once."""

    @property
    def identity(self) -> Identity | None: ...
    @property
    def render_id(self) -> str: ...

    tracking_state: Any


class TrackingHooks(Protocol):
    """What a page view asks of tracking (``tracking.Tracking`` implements it)."""

    def impression_attrs(self, page: PageView, experience: Experience) -> Markup: ...

    def click_attrs(self, page: PageView, experience: Experience, b_id: object) -> Markup: ...

    def script_tag(self, nonce: str | None = None, *, root_path: str = "") -> Markup: ...
