"""``PersonalizeMiddleware``: the pure ASGI middleware that personalizes every page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from os import PathLike
from typing import Literal

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._campaigns import CampaignSync
from ._config import PersonalizeSettings, positive_int, positive_number
from ._context import DEFAULT_QUERY_PARAMS, SessionAttributes
from ._exceptions import ConfigurationError
from ._fork import abandon, register
from ._headers import make_private
from ._identity import (
    DEFAULT_VISITOR_COOKIE,
    IdentityResolver,
    VisitorCookie,
    call_resolver,
    default_identity,
)
from ._interfaces import PersonalizeBackend, SharedLayer
from ._lifecycle import Lifecycle
from ._models import Identity
from ._personalization import Personalization, current_personalization
from ._reporting import ReportingBackend
from ._routes import RouteKeys, RoutesConfig
from ._signing import Keyring
from .cache import (
    DEFAULT_CACHE_MAXSIZE,
    DEFAULT_CACHE_TTL,
    DEFAULT_MAX_CONCURRENT_FETCHES,
    DEFAULT_STALE_IF_ERROR,
    DEFAULT_STALE_WHILE_REVALIDATE,
    ExperienceStore,
)
from .local import ReportSource, local_report_app
from .tracking import DEFAULT_TOKEN_TTL, Tracking
from .upstream import DEFAULT_METADATA_REFRESH, CircuitBreaker, MetadataWatcher

__all__ = ["DEFAULT_LATENCY_BUDGET", "DEFAULT_TRACKING_PREFIX", "PersonalizeMiddleware"]

logger = logging.getLogger("personalize_middleware")

DEFAULT_LATENCY_BUDGET = 0.15
DEFAULT_TRACKING_PREFIX = "/_personalize"
_NO_FETCH_METHODS = frozenset({"OPTIONS"})


class PersonalizeMiddleware:
    """Resolves the user, starts fetching the route's experiences at once, and hands the
    request a ``Personalization`` (``request.state.personalize``).

    Backend choice: ``backend`` if given (you own its lifecycle); else the HTTP client
    built from ``settings`` (or from ``MOENGAGE_*`` environment variables when they hold
    credentials); else the embedded local engine on ``local_experiences`` (or the packaged
    sample file), which needs no network and no credentials.

    Add it *before* ``SessionMiddleware`` / ``AuthenticationMiddleware`` so they wrap it and
    the session and user are known when the identity is resolved.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: PersonalizeSettings | None = None,
        backend: PersonalizeBackend | None = None,
        local_experiences: str | PathLike[str] | None = None,
        routes: RoutesConfig | None = None,
        site_keys: Sequence[str] = (),
        identify: IdentityResolver | None = None,
        secret_key: str | Sequence[str] | None = None,
        latency_budget: float = DEFAULT_LATENCY_BUDGET,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        stale_while_revalidate: float = DEFAULT_STALE_WHILE_REVALIDATE,
        stale_if_error: float = DEFAULT_STALE_IF_ERROR,
        cache_maxsize: int = DEFAULT_CACHE_MAXSIZE,
        max_concurrent_fetches: int = DEFAULT_MAX_CONCURRENT_FETCHES,
        query_params: Sequence[str] = DEFAULT_QUERY_PARAMS,
        send_day_of_week: bool = True,
        send_time_of_day: bool = True,
        send_user_agent: bool = True,
        send_ip_address: bool = True,
        trusted_proxies: Sequence[str] = (),
        visitor_cookie: str = DEFAULT_VISITOR_COOKIE,
        tracking: bool | Tracking = True,
        tracking_prefix: str = DEFAULT_TRACKING_PREFIX,
        impressions: Literal["client", "server"] = "client",
        tracking_allowed_origins: Sequence[str] = (),
        tracking_token_ttl: float = DEFAULT_TOKEN_TTL,
        metadata_refresh: float | None = DEFAULT_METADATA_REFRESH,
        local_report: bool | None = None,
        shared: SharedLayer | None = None,
        breaker: CircuitBreaker | None = None,
        exclude_paths: Sequence[str] = (),
    ) -> None:
        self.app = app
        positive_number("latency_budget", latency_budget)
        positive_number("cache_ttl", cache_ttl)
        positive_int("cache_maxsize", cache_maxsize)
        positive_int("max_concurrent_fetches", max_concurrent_fetches)
        if not tracking_prefix.startswith("/") or tracking_prefix.endswith("/"):
            raise ConfigurationError(
                "tracking_prefix must start with '/' and not end with '/'", field="tracking_prefix"
            )
        self.routes = RouteKeys(routes, site_keys)
        self.local_mode = False
        self._owns_backend = backend is None
        if backend is None:
            if settings is None and PersonalizeSettings.env_has_credentials():
                settings = PersonalizeSettings.from_env()
            if settings is not None:
                from .upstream import PersonalizeClient

                backend = PersonalizeClient(settings)
            else:
                from .local import LocalBackend

                backend = (
                    LocalBackend(local_experiences)
                    if local_experiences is not None
                    else LocalBackend.default()
                )
                self.local_mode = True
        self.backend: PersonalizeBackend = backend
        if shared is None and settings is not None and settings.redis_url:
            from .cache.redis import RedisSharedLayer

            shared = RedisSharedLayer.from_settings(settings)
        self.keyring = Keyring.from_config(
            secret_key, api_secret=settings.api_secret if settings is not None else None
        )
        self.store = ExperienceStore(
            backend,
            ttl=cache_ttl,
            stale_while_revalidate=stale_while_revalidate,
            stale_if_error=stale_if_error,
            maxsize=cache_maxsize,
            max_concurrent_fetches=max_concurrent_fetches,
            shared=shared,
            breaker=breaker,
        )
        self.attributes = SessionAttributes(
            day_of_week=send_day_of_week,
            time_of_day=send_time_of_day,
            user_agent=send_user_agent,
            ip_address=send_ip_address,
            query_params=query_params,
            trusted_proxies=trusted_proxies,
        )
        self.identify: IdentityResolver = identify or default_identity
        self.visitor_cookie = VisitorCookie(self.keyring, name=visitor_cookie)
        self.latency_budget = float(latency_budget)
        show_report = self.local_mode if local_report is None else bool(local_report)
        events_backend: PersonalizeBackend = backend
        if show_report and not isinstance(backend, ReportSource):
            # Not the local engine: the report counts what this process sent.
            events_backend = ReportingBackend(backend)
        if isinstance(tracking, Tracking):
            if tracking_prefix not in (DEFAULT_TRACKING_PREFIX, tracking.prefix):
                raise ConfigurationError(
                    f"tracking_prefix={tracking_prefix!r} differs from the Tracking object's "
                    f"prefix {tracking.prefix!r}: set it once, as Tracking(prefix=...)",
                    field="tracking_prefix",
                )
            tracking_prefix = tracking.prefix  # the Tracking object owns its prefix
            self.tracking: Tracking | None = tracking
        elif tracking:
            self.tracking = Tracking(
                keyring=self.keyring,
                backend=events_backend,
                prefix=tracking_prefix,
                impressions=impressions,
                allowed_origins=tracking_allowed_origins,
                token_ttl=tracking_token_ttl,
            )
        else:
            self.tracking = None
        self.tracking_prefix = tracking_prefix
        self._own_prefix = tracking_prefix + "/"
        self.metadata = (
            MetadataWatcher(backend, self.routes.configured_keys, interval=metadata_refresh)
            if metadata_refresh
            else None
        )
        self.report_path = tracking_prefix + "/report" if show_report else None
        self._report_source: ReportSource | None = None
        if show_report:
            self._report_source = (
                backend if isinstance(backend, ReportSource) else events_backend  # type: ignore[assignment]
            )
        self._report_app: ASGIApp | None = None
        self.exclude_paths = tuple(exclude_paths)
        self._state = Lifecycle.NEW
        self._start_lock: asyncio.Lock | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._campaigns = CampaignSync(self.store, self.metadata)
        register(self)  # nothing above made a task or a socket; startup() does, per process

    @property
    def configured_keys(self) -> tuple[str, ...]:
        """Every key the route configuration can request (for ``personalize-middleware check``)."""
        return self.routes.configured_keys

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def state(self) -> Lifecycle:
        """``NEW``, ``RUNNING``, ``CLOSING`` or ``CLOSED``."""
        return self._state

    async def startup(self) -> None:
        """Open the backend, start the tracking batcher and the metadata refresher.

        Runs on the app's lifespan start-up, or on the first request when the server does
        not run the lifespan. Nothing here blocks on the network. A start-up that fails
        half-way closes what it had opened, in reverse order, and raises."""
        if self._state is Lifecycle.RUNNING:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.state is Lifecycle.RUNNING:  # started while this call waited for the lock
                return
            async with contextlib.AsyncExitStack() as stack:
                if self._owns_backend:
                    await self.backend.__aenter__()
                    stack.push_async_callback(self.backend.aclose)
                await self.store.start()
                stack.push_async_callback(self.store.aclose)
                if self.tracking is not None:
                    await self.tracking.start()
                    stack.push_async_callback(self.tracking.aclose)
                if self.metadata is not None:
                    self.metadata.start()
                    stack.push_async_callback(self.metadata.aclose)
                self._exit_stack = stack.pop_all()
            self._state = Lifecycle.RUNNING
            logger.info(
                "personalize: started (%s backend, %d configured keys)",
                "local" if self.local_mode else type(self.backend).__name__,
                len(self.routes.configured_keys),
            )

    def reset_after_fork(self) -> None:
        """In a forked child: NEW, to start its own tasks (components reset, ``_fork``)."""
        abandon(self._exit_stack)
        self._exit_stack, self._start_lock, self._state = None, None, Lifecycle.NEW

    async def refresh(self, keys: Sequence[str] = ()) -> int:
        """All processes re-read statuses, forget ``keys``; returns how many heard it."""
        return await self._campaigns.refresh(keys)

    async def shutdown(self) -> None:
        """Flush pending events, stop refreshers, close what the middleware owns (in the
        reverse order of start-up)."""
        if self._state is not Lifecycle.RUNNING:
            return
        self._state = Lifecycle.CLOSING
        self._start_lock = None  # bound to this loop; a later lifespan may run another
        stack, self._exit_stack = self._exit_stack, None
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            self._state = Lifecycle.CLOSED

    # -- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            await self._http(scope, receive, send)
        elif scope_type == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        await self.app(scope, lifespan_receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._state is not Lifecycle.RUNNING:
            await self.startup()
        path: str = scope["path"]
        if path.startswith(self._own_prefix):
            await self._own_endpoint(scope, receive, send)
            return
        if self.exclude_paths and path.startswith(self.exclude_paths):
            await self.app(scope, receive, send)
            return
        keys = () if scope["method"] in _NO_FETCH_METHODS else self.routes.keys_for(path)
        visitor = _VisitorState()

        async def identity_factory() -> Identity:
            return await self._resolve_identity(scope, visitor)

        handle = Personalization(
            store=self.store,
            keys=keys,
            attributes=self.attributes.build(scope),
            budget=self.latency_budget,
            identity_factory=identity_factory,
            tracking=self.tracking,
            active_keys=self.metadata.active if self.metadata is not None else None,
        )
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["personalize"] = handle
        await handle.start()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._decorate_response(message, handle, visitor, scope)
            await send(message)

        token = current_personalization.set(handle)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            current_personalization.reset(token)

    async def _own_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The tracking endpoint, the script and (in local mode) the report."""
        report = self.report_path
        if report is not None and (
            scope["path"] == report or scope["path"].startswith(report + "/")
        ):
            if self._report_app is None:
                assert self._report_source is not None  # set with report_path
                self._report_app = local_report_app(self._report_source)
            await self._report_app(scope, receive, send)
            return
        if self.tracking is None:
            await self.app(scope, receive, send)
            return
        identity = (
            await self._resolve_identity(scope, _VisitorState(), issue=False)
            if scope["method"] == "POST"  # only beacons are checked against the visitor
            else None
        )
        await self.tracking.handle(scope, receive, send, identity)

    async def _resolve_identity(
        self, scope: Scope, visitor: _VisitorState, *, issue: bool = True
    ) -> Identity:
        conn = HTTPConnection(scope)
        identity = await call_resolver(self.identify, conn)
        if identity is not None:
            return identity
        visitor_id, resign = self.visitor_cookie.read(_cookie_header(scope))
        if visitor_id is None:
            visitor_id = self.visitor_cookie.new_id()
            resign = issue
        visitor.set_cookie = resign
        visitor.visitor_id = visitor_id
        return Identity(visitor_id=visitor_id)

    def _decorate_response(
        self, message: Message, handle: Personalization, visitor: _VisitorState, scope: Scope
    ) -> None:
        if not handle.used and not visitor.set_cookie:
            return
        cookie = None
        if visitor.set_cookie and visitor.visitor_id is not None:
            cookie = self.visitor_cookie.set_cookie_header(
                visitor.visitor_id, secure=scope.get("scheme") == "https"
            )
        make_private(message, used=handle.used, set_cookie=cookie)


class _VisitorState:
    __slots__ = ("set_cookie", "visitor_id")

    def __init__(self) -> None:
        self.set_cookie = False
        self.visitor_id: str | None = None


def _cookie_header(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            return str(value.decode("latin-1"))
    return None
