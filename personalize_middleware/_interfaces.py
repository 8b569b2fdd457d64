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
``EventOutbox``         where accepted events wait until MoEngage has them: in memory, in
                        a local SQLite file or in a Redis stream (``tracking._outbox*``)
``PageTools``           a request's developer tools: the preview it renders, the overlay
                        and banner, ``Server-Timing`` (``devtools.DevSession``)
``InspectedPage``       what those tools read of a page view (a ``Personalization``)
``Telemetry``           observes the middleware at a few points (upstream calls, cache
                        results, the breaker, events, each page's personalization): the
                        ``telemetry`` package's ``OpenTelemetry`` and ``PrometheusMetrics``
``PageTrace``           one page's observation, as ``Telemetry.page_started`` returns it

Longer than ~400 lines because every protocol lives here, on purpose: one module the
feature packages meet at, none of them importing another.
"""

from __future__ import annotations

from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, runtime_checkable

from ._decisions import Decision
from ._models import (
    CachedExperience,
    EventAction,
    EventElement,
    Experience,
    ExperienceMetadata,
    FetchQuery,
    Identity,
)

if TYPE_CHECKING:
    from markupsafe import Markup
    from starlette.requests import HTTPConnection

    from ._grants import PreviewGrant

__all__ = [
    "Broadcaster",
    "EventOutbox",
    "EventSink",
    "FetchFn",
    "IdentityResolver",
    "InspectedPage",
    "KeyOutcome",
    "KeyReason",
    "OutboxEntry",
    "PageTools",
    "PageTrace",
    "PageView",
    "PersonalizeBackend",
    "PutResult",
    "SharedEntries",
    "SharedLayer",
    "Telemetry",
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
    delivery. ``record`` returns ``True`` when the event was queued (new and deliverable).

    ``record_all`` takes a beacon's events and returns once they are *stored* (in a
    durable outbox: written, so an answer 204 means the event survives a crash);
    ``False`` when the outbox could not store them (the endpoint answers 503)."""

    def record(self, identity: Identity, event: TrackedEvent, now: float) -> bool: ...

    async def record_all(
        self, identity: Identity, events: Sequence[TrackedEvent], now: float
    ) -> bool: ...


@dataclass(slots=True)
class OutboxEntry:
    """One stored action: ``key`` is the outbox's own id for it (a stream entry id, a row
    id), ``size`` its JSON size in bytes (``-1``: not measured yet), ``enqueued_at`` the
    Unix time it was stored (the same clock on every process)."""

    key: str
    customer_id: str
    action: EventAction
    size: int
    enqueued_at: float


@dataclass(slots=True)
class PutResult:
    """What ``EventOutbox.put`` did with the actions: ``stored``; refused because the
    outbox is ``full``; refused because that visitor already has ``max_per_visitor``
    actions waiting (``flood``)."""

    stored: int = 0
    full: int = 0
    flood: int = 0


@runtime_checkable
class EventOutbox(Protocol):
    """Where accepted events wait until MoEngage has accepted them.

    ``put`` stores (for a durable outbox: the data is written when it returns) or raises
    ``OutboxUnavailableError``. ``take`` leases up to ``limit`` of the oldest entries
    nobody holds to this process (a lease held by a process that died is taken over after
    the outbox's timeout); ``ack`` deletes delivered (or given-up) entries; ``release``
    hands leased entries back at once (shutdown). ``pending`` is the number of entries
    stored, as last seen (other processes' included for a shared outbox).
    """

    @property
    def durable(self) -> bool: ...

    @property
    def pending(self) -> int: ...

    async def start(self) -> None: ...

    async def put(self, items: Sequence[tuple[str, EventAction]], now: float) -> PutResult: ...

    async def take(self, limit: int) -> list[OutboxEntry]: ...

    async def ack(self, entries: Sequence[OutboxEntry]) -> None: ...

    async def release(self, entries: Sequence[OutboxEntry]) -> None: ...

    async def aclose(self) -> None: ...


class PageView(Protocol):
    """What tracking reads of a page view (a ``Personalization`` is one). ``tracking_state``
    is a slot the tracking hooks own: per-page-view parts they compute once."""

    @property
    def identity(self) -> Identity | None: ...
    @property
    def render_id(self) -> str: ...

    #: The request's User-Agent, when known (crawlers are not tracked).
    user_agent: str | None
    tracking_state: Any


class TrackingHooks(Protocol):
    """What a page view asks of tracking (``tracking.Tracking`` implements it)."""

    def impression_attrs(self, page: PageView, experience: Experience) -> Markup: ...

    def click_attrs(self, page: PageView, experience: Experience, b_id: object) -> Markup: ...

    def script_tag(
        self, nonce: str | None = None, *, root_path: str = "", page: PageView | None = None
    ) -> Markup: ...

    def open_manifest(self, page: PageView) -> None: ...

    def pending_manifest(self, page: PageView) -> str: ...


class InspectedPage(PageView, Protocol):
    """What the developer tools read of a page view (a ``Personalization`` is one)."""

    @property
    def decisions(self) -> Mapping[str, Decision]: ...
    @property
    def sources(self) -> str: ...
    @property
    def waited_ms(self) -> float: ...
    @property
    def tracking(self) -> TrackingHooks | None: ...

    def experience(self, key: str) -> Experience | None: ...


class PageTools(Protocol):
    """A request's developer tools (``devtools.DevSession``): the preview it renders
    (``None``: the visitor's own experiences), the markup ``personalize_script()`` adds
    (preview banner, debug overlay), the headers added on ``http.response.start``."""

    @property
    def preview(self) -> PreviewGrant | None: ...
    @property
    def script_hashes(self) -> tuple[str, ...]: ...

    def page_markup(
        self, page: InspectedPage, nonce: str | None = None, *, root_path: str = ""
    ) -> Markup: ...

    def decorate(self, message: MutableMapping[str, Any], page: InspectedPage) -> None: ...


#: Why a page got what it got for one key (the values of OpenTelemetry's
#: ``feature_flag.result.reason`` that apply): ``cached`` a fresh cache hit; ``stale``
#: stale content (stale-while-revalidate, or stale-if-error after a failure or when the
#: latency budget ran out); ``targeting_match`` the upstream answered a variation now;
#: ``default`` the upstream answered that the user matches no variation, or the page did
#: not wait for the answer; ``error`` nothing arrived (failure, timeout, shed, circuit
#: open) and nothing stale stood in; ``disabled`` the key is not Active in the workspace.
KeyReason = Literal["cached", "stale", "targeting_match", "default", "error", "disabled"]


class KeyOutcome(Protocol):
    """What one key of one page resolved to."""

    @property
    def reason(self) -> KeyReason: ...
    @property
    def experience(self) -> Experience | None: ...


class PageTrace(Protocol):
    """One page view's personalization, observed from the request's start.

    ``activate`` is entered around the start of the page's fetches (so a tracer can make
    the upstream calls children of the page); ``finish`` is called once, when the handle's
    wait completes or the response starts, whichever comes first."""

    def activate(self) -> AbstractContextManager[object]: ...

    def finish(self, outcomes: Mapping[str, KeyOutcome]) -> None: ...


class Telemetry(Protocol):
    """Observes the middleware; every method defaults to doing nothing, so an
    implementation overrides only what it needs (subclassing this class is fine).

    Methods are called on the request path and in background tasks, on the event loop:
    they must be quick and must not raise (``PersonalizeMiddleware`` logs and swallows
    what they raise). Nothing calls them when no telemetry is configured.

    ``endpoint`` is the upstream endpoint (``"POST /experiences/fetch"``); ``status`` the
    HTTP status when an answer arrived; ``source`` of a cache result is ``hit``,
    ``stale``, ``miss``, ``coalesced``, ``shared`` (fresh from the shared L2), ``shed``
    or ``fallback`` (stale-if-error served); event ``outcome``s are the counters of
    ``BatcherStats`` (``queued``, ``sent``, ``retried``, ``dropped_overflow``, ...)
    and ``accepted``.
    """

    def page_started(self, keys: tuple[str, ...]) -> PageTrace | None:
        """A page request started (``keys``: its route's keys); ``None``: not traced."""
        return None

    def upstream_call_started(self, endpoint: str) -> object:
        """An HTTP call to MoEngage starts; what it returns is handed to ``..._finished``."""
        return None

    def upstream_call_finished(
        self,
        call: object,
        endpoint: str,
        seconds: float,
        status: int | None,
        error: BaseException | None,
    ) -> None:
        """The call ended: answered (``error`` is ``None``), failed or was cancelled."""
        return None

    def cache_result(self, source: str, count: int) -> None:
        """``count`` keys were answered (or not) by ``source``."""
        return None

    def fetch_failed(self, error: BaseException) -> None:
        """A fetch for a page failed or was not made (circuit open, budget spent)."""
        return None

    def breaker_changed(self, state: str) -> None:
        """The circuit breaker is now ``closed``, ``open`` or ``half-open``."""
        return None

    def event_accepted(self, event: TrackedEvent) -> None:
        """A verified impression or click was accepted for delivery."""
        return None

    def events_counted(self, outcome: str, count: int) -> None:
        """``count`` events reached ``outcome`` (``sent``, ``retried``, ``dropped_*`` ...)."""
        return None

    def outbox_depth(self, depth: int) -> None:
        """Events waiting for delivery in this process (the batcher's queue, or an outbox)."""
        return None
