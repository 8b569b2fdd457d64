"""``PersonalizeMiddleware``: the pure ASGI middleware that personalizes every page.

Longer than ~400 lines because the constructor is where every public option is wired to
its feature, next to the request path those options shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._campaigns import CampaignSync
from ._config import invalid_option
from ._context import SessionAttributes, header_text
from ._exceptions import ConfigurationError
from ._fork import abandon, register
from ._headers import ResponseGate
from ._identity import (
    IdentityResolver,
    VisitorCookie,
    VisitorState,
    default_identity,
    resolve_identity,
    session_identity,
)
from ._interfaces import PersonalizeBackend
from ._lifecycle import Lifecycle, startup_failure
from ._mode import (
    choose_backend,
    local_mode_warning,
    metadata_watcher,
    report_access,
    report_app,
)
from ._models import FetchQuery
from ._options import (
    DEFAULT_LATENCY_BUDGET,
    DEFAULT_TRACKING_PREFIX,
    MiddlewareOptions,
    ResolvedOptions,
)
from ._overrides import current_override
from ._personalization import Personalization, current_personalization
from ._proxies import TrustedProxies
from ._reporting import ReportingBackend
from ._resolve import resolve_options
from ._routes import RouteKeys
from ._signing import Keyring
from ._visit import VisitMemo
from .cache import ClientLimiter, ExperienceStore
from .devtools import DevTools
from .local import ReportSource
from .telemetry import connect_telemetry, observe_page
from .tracking import Tracking, experience_token_part, outbox_from_settings

__all__ = ["DEFAULT_LATENCY_BUDGET", "DEFAULT_TRACKING_PREFIX", "PersonalizeMiddleware"]

logger = logging.getLogger("personalize_middleware")

_NO_FETCH_METHODS = frozenset({"OPTIONS"})


class PersonalizeMiddleware:
    """Resolves the user, starts fetching the route's experiences at once, and hands the
    request a ``Personalization`` (``request.state.personalize``).

    Backend choice: ``backend`` if given (you own its lifecycle); else the HTTP client
    built from ``settings``, or from ``MOENGAGE_*`` environment variables when they hold
    credentials; else, when no ``MOENGAGE_*`` variable is set at all, the embedded local
    engine on ``local_experiences`` (or the packaged sample file), which needs no network
    and no credentials. Credentials half set are a configuration error, never local mode.

    The options are checked here, but a mistake is not raised here: Starlette builds
    middleware lazily, inside the first ASGI call, where an exception does not stop
    uvicorn (see ``_options``). It is kept in ``configuration_error`` and fails the
    lifespan start-up with one line (``lifespan.startup.failed``); ``startup()`` raises
    it, and so does every request when the server runs no lifespan.

    Add it *before* ``SessionMiddleware`` / ``AuthenticationMiddleware`` so they wrap it and
    the session and user are known when the identity is resolved.
    """

    def __init__(
        self, app: ASGIApp, *positional: object, **options: Unpack[MiddlewareOptions]
    ) -> None:
        self.app = app
        self.local_mode = False
        #: The mistake that keeps the middleware from starting, if any (see the docstring).
        self.configuration_error: Exception | None = None
        self._state = Lifecycle.NEW
        self._start_lock: asyncio.Lock | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        register(self)  # nothing here makes a task or a socket; startup() does, per process
        try:
            if positional:
                raise invalid_option(
                    "options", positional[0], "keyword arguments only (routes=..., ...)"
                )
            self._configure(resolve_options(options))
        except Exception as exc:  # kept for start-up: raising here would not stop uvicorn
            self.configuration_error = exc

    def _configure(self, options: ResolvedOptions) -> None:
        self.routes = RouteKeys(options.routes, options.site_keys)
        proxies = TrustedProxies(options.trusted_proxies)  # checked before they are used
        mode = choose_backend(options)
        backend, settings, self.local_source = mode.backend, mode.settings, mode.local_source
        owns_backend = mode.owns_backend
        test_tracking: Mapping[str, Any] = {}
        if (override := current_override()) is not None:  # personalize_middleware.testing
            backend, settings, self.local_source = override.backend, None, None
            owns_backend, test_tracking = False, override.tracking
        self.backend: PersonalizeBackend = backend
        self._owns_backend = owns_backend
        self.local_mode = self.local_source is not None
        shared = options.shared
        if shared is None and settings is not None and settings.redis_url:
            from .cache.redis import RedisSharedLayer

            shared = RedisSharedLayer.from_settings(settings)
        self.keyring = Keyring.from_config(
            options.secret_key,
            api_secret=settings.api_secret if settings is not None else None,
            warn=not self.local_mode,  # local mode says so in its own start-up warning
        )
        cache = options.cache
        self.store = ExperienceStore(
            backend,
            ttl=cache.ttl,
            stale_while_revalidate=cache.stale_while_revalidate,
            stale_if_error=cache.stale_if_error,
            maxsize=cache.maxsize,
            max_concurrent_fetches=cache.max_concurrent_fetches,
            shared=shared,
            breaker=options.breaker,
            limiter=(
                ClientLimiter(options.client_limits) if options.client_limits is not None else None
            ),
        )
        attributes = options.attributes
        self.attributes = SessionAttributes(
            day_of_week=attributes.day_of_week,
            time_of_day=attributes.time_of_day,
            user_agent=attributes.user_agent,
            ip_address=attributes.ip_address,
            query_params=attributes.query_params,
            trusted_proxies=options.trusted_proxies,
        )
        self.identify: IdentityResolver = options.identify or default_identity
        cookie = options.cookie
        self.visitor_cookie = VisitorCookie(
            self.keyring,
            name=cookie.name,
            max_age=cookie.max_age,
            domain=cookie.domain,
            path=cookie.path,
            same_site=cookie.same_site,
            https_only=cookie.https_only,
            proxies=proxies,
        )
        self.latency_budget = options.latency_budget
        self.report_guard, show_report = report_access(
            options.report, backend, local_mode=self.local_mode
        )
        events_backend: PersonalizeBackend = backend
        if show_report and not isinstance(backend, ReportSource):
            # Not the local engine: the report counts what this process sent.
            events_backend = ReportingBackend(backend)
        tracking = options.tracking
        if isinstance(tracking, Tracking):
            self.tracking: Tracking | None = tracking  # the app's own: it owns its prefix
        elif tracking.enabled:
            built: dict[str, Any] = {
                "prefix": tracking.prefix,
                "impressions": tracking.impressions,
                "allowed_origins": tracking.allowed_origins,
                "token_ttl": tracking.token_ttl,
                "bots": tracking.bots,
                "limits": tracking.limits,
                "body_timeout": tracking.body_timeout,
                # settings.events_outbox: in memory, a SQLite file or Redis (with redis_url)
                "outbox": outbox_from_settings(settings) if settings is not None else None,
            }
            built.update(test_tracking)  # the testing kit's relaxed limits, fast flushes
            self.tracking = Tracking(keyring=self.keyring, backend=events_backend, **built)
        else:
            self.tracking = None
        self.tracking_prefix: str = tracking.prefix
        self._own_prefix = self.tracking_prefix + "/"
        devtools = DevTools(
            keyring=self.keyring,
            prefix=self.tracking_prefix,
            preview=options.preview,
            qa_cookies=options.qa_cookies,
            overlay=self.local_mode if options.debug_overlay is None else options.debug_overlay,
            server_timing=options.server_timing,
            experience_part=experience_token_part,
        )
        #: ``None`` when every developer tool is off (requests then never look for them).
        self.devtools: DevTools | None = devtools if devtools.enabled else None
        self.metadata = metadata_watcher(
            backend, self.routes.configured_keys, options.metadata_refresh, self.local_source
        )
        self.report_path = self.tracking_prefix + "/report" if show_report else None
        self._report_source: ReportSource | None = None
        if show_report:
            self._report_source = (
                backend if isinstance(backend, ReportSource) else events_backend  # type: ignore[assignment]
            )
        self._report_app: ASGIApp | None = None
        self.exclude_paths = options.exclude_paths
        #: What observes the middleware (``OpenTelemetry()``, ``PrometheusMetrics()``, ...).
        self.telemetry = connect_telemetry(options.telemetry, self.store, backend, self.tracking)
        #: "defaults": known crawlers get every experience's default, with no upstream call.
        self.crawlers = options.crawlers
        # The page view's User-Agent is needed for crawler checks even when it is not sent.
        self._needs_user_agent = self.crawlers == "defaults" or (
            self.tracking is not None and self.tracking.bots == "ignore"
        )
        self._campaigns = CampaignSync(self.store, self.metadata)
        self._default_identity = self.identify is default_identity
        #: ``resolve_identity`` with this middleware's resolver and cookie.
        self._identity = functools.partial(resolve_identity, self.identify, self.visitor_cookie)
        self._active = self.metadata.active if self.metadata is not None else None
        self._key_status = self.metadata.status if self.metadata is not None else None
        self._visits = VisitMemo(
            self.attributes,
            self.visitor_cookie,
            crawler_defaults=self.crawlers == "defaults",
            needs_user_agent=self._needs_user_agent,
        )

    @property
    def configured_keys(self) -> tuple[str, ...]:
        """Every key the route configuration can request (for ``personalize-middleware check``)."""
        self._raise_configuration_error()
        return self.routes.configured_keys

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def state(self) -> Lifecycle:
        """``NEW``, ``RUNNING``, ``CLOSING`` or ``CLOSED``."""
        return self._state

    def _raise_configuration_error(self) -> None:
        if self.configuration_error is not None:
            raise self.configuration_error

    async def startup(self) -> None:
        """Open the backend, start the tracking batcher and the metadata refresher.

        Runs on the app's lifespan start-up, or on the first request when the server does
        not run the lifespan. Nothing here blocks on the network. A start-up that fails
        half-way closes what it had opened, in reverse order, and raises. A configuration
        mistake (``configuration_error``) is raised here."""
        if self._state is Lifecycle.RUNNING:
            return
        self._raise_configuration_error()
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
            if self.local_mode:
                # WARNING, not INFO: servers show warnings by default, and a production
                # that meant MoEngage must not run on the sample file unnoticed.
                logger.warning(local_mode_warning(self.local_source, self.report_path))
            else:
                logger.info(
                    "personalize: started (%s backend, %d configured keys)",
                    type(self.backend).__name__,
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
        """Start before the app's own lifespan runs: a failure is ``lifespan.startup.failed``
        with one line, which stops uvicorn and gunicorn (in every lifespan mode that runs
        the lifespan), and the exception is raised for servers and test clients that look
        at it. The app's start-up message is then replayed to it."""
        first: Message | None = await receive()
        if first is not None and first["type"] == "lifespan.startup":
            try:
                await self.startup()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": startup_failure(exc)})
                if not isinstance(exc, ConfigurationError):
                    logger.error("personalize: start-up failed", exc_info=exc)
                raise

        async def lifespan_receive() -> Message:
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            message = await receive()
            if message["type"] == "lifespan.shutdown":
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
        visit = self._visits.visit(scope)
        keys = (
            self.routes.keys_for(path)
            if visit.fetch and scope["method"] not in _NO_FETCH_METHODS
            else ()
        )
        attributes = visit.attributes
        visitor = VisitorState()
        visitor.cookie_header = visit.cookie_header
        tools = self.devtools.session(scope, visit.cookie_header) if self.devtools else None
        preview = tools.preview if tools is not None else None
        query = None
        if preview is not None:
            # The grant's customer or audience, not the visitor (never resolved: no visitor
            # cookie, nothing cached for the visitor), and no hooks: nothing reaches MoEngage.
            attributes = preview.apply(attributes)
        elif keys and self._default_identity:
            # The default resolver, synchronously; the visitor only when resolving it has
            # no side effect (a valid cookie: nothing to issue). Else resolved lazily.
            identity = session_identity(scope)
            if identity is not None:
                query = FetchQuery(identity, attributes)
            elif visit.query is not None:
                query = visit.query
                visitor.visitor_id = visit.visitor_id
        telemetry = self.telemetry
        handle = Personalization(
            store=self.store,
            keys=keys,
            attributes=attributes,
            budget=self.latency_budget,
            identity_factory=(
                None
                if query is not None
                else preview.resolve
                if preview is not None
                else functools.partial(self._identity, scope, visitor)
            ),
            query=query,
            tracking=self.tracking if preview is None else None,
            active_keys=self._active,
            key_status=self._key_status,
            devtools=tools,
            user_agent=visit.user_agent,
            fetch=visit.fetch,
            observer=None if telemetry is None else observe_page(telemetry, keys, self.store),
            # Worked out only on a miss: a cache hit never pays for it.
            client=functools.partial(self.attributes.client_key, scope),
        )
        if preview is not None:
            handle.used = True  # private, no-store, Vary: Cookie, whatever the page reads
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["personalize"] = handle
        if query is not None:
            handle.begin()
        else:
            await handle.start()

        gate = ResponseGate(send, handle, visitor, self.visitor_cookie, scope)
        token = current_personalization.set(handle)
        try:
            await self.app(scope, receive, gate.send)
        finally:
            current_personalization.reset(token)
            if telemetry is not None:
                handle.finish_observing()  # the page's trace ends with the request at the latest
            handle.end_request(
                None
                if handle.identity is not None
                else preview.resolve  # refers to no scope
                if preview is not None
                else functools.partial(self._identity, _without_state(scope), visitor)
            )
        if gate.held is not None:  # not reached on an exception: a held start is dropped
            await gate.finish()

    async def _own_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The tracking endpoint, the script, the developer tools' endpoints and (in local
        mode) the report."""
        if self.devtools is not None and await self.devtools.intercept(
            scope, receive, send, header_text(scope, b"cookie")
        ):
            return  # its own endpoints, or a previewing browser's beacon (dropped)
        report = self.report_path
        if report is not None and (
            scope["path"] == report or scope["path"].startswith(report + "/")
        ):
            if self._report_app is None:
                assert self._report_source is not None  # set with report_path
                self._report_app = report_app(self._report_source, self.report_guard)
            await self._report_app(scope, receive, send)
            return
        if self.tracking is None:
            await self.app(scope, receive, send)
            return
        identity = (
            await self._identity(scope, VisitorState(), issue=False)
            if scope["method"] == "POST"  # only beacons are checked against the visitor
            else None
        )
        client_ip = self.attributes.client_ip(scope) if scope["method"] == "POST" else None
        await self.tracking.handle(scope, receive, send, identity, client_ip=client_ip)


def _without_state(scope: Scope) -> Scope:
    """A copy of ``scope`` that does not refer to the request's handle."""
    return {name: value for name, value in scope.items() if name != "state"}
