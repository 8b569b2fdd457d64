"""The middleware's options: four option groups (checked by ``_resolve``).

``PersonalizeMiddleware(app, **options)`` takes a few top-level options and groups the
rest, like ``httpx.Timeout`` groups timeouts::

    cache=CacheOptions(ttl=60, stale_while_revalidate=300, ...)
    attributes=AttributeOptions(user_agent=False, query_params=["utm_medium"])
    cookie=CookieOptions(domain=".example.com", same_site="lax")
    tracking=TrackingOptions(impressions="server")

The flat keyword arguments of earlier releases (``cache_ttl=``, ``send_user_agent=``,
``visitor_cookie=``, ``tracking_prefix=``, ``local_report=``, ...) still work: each maps
onto its group (``LEGACY_OPTIONS``); giving both spellings is an error.

Why the groups only hold values and ``_resolve.resolve_options`` checks them: Starlette builds
middleware lazily, inside the app's first ASGI call, which under uvicorn is the lifespan
start-up. An exception there is not a failed start-up: uvicorn's default lifespan mode
("auto") logs "ASGI 'lifespan' protocol appears unsupported" and serves, and every request
then answers 500. The middleware therefore checks everything when it is built, keeps a
``ConfigurationError`` instead of raising it, and fails the lifespan start-up with one line
(``lifespan.startup.failed``), which stops uvicorn and gunicorn's uvicorn worker. An option
object that raised when constructed at import time would be a traceback in gunicorn's log
instead (gunicorn logs a worker's import errors with the full traceback).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import TYPE_CHECKING, Literal, TypedDict

from ._config import PersonalizeSettings
from ._context import DEFAULT_QUERY_PARAMS
from ._identity import DEFAULT_VISITOR_COOKIE, DEFAULT_VISITOR_MAX_AGE
from ._interfaces import IdentityResolver, PersonalizeBackend, SharedLayer, Telemetry
from ._routes import RoutesConfig
from .cache import (
    DEFAULT_CACHE_MAXSIZE,
    DEFAULT_CACHE_TTL,
    DEFAULT_CLIENT_LIMITS,
    DEFAULT_MAX_CONCURRENT_FETCHES,
    DEFAULT_STALE_IF_ERROR,
    DEFAULT_STALE_WHILE_REVALIDATE,
    ClientLimits,
)
from .tracking import DEFAULT_BODY_TIMEOUT, DEFAULT_TOKEN_TTL, Tracking, TrackingLimits
from .upstream import CircuitBreaker

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = [
    "DEFAULT_LATENCY_BUDGET",
    "DEFAULT_TRACKING_PREFIX",
    "LEGACY_OPTIONS",
    "MAX_LATENCY_BUDGET",
    "AttributeOptions",
    "CacheOptions",
    "CookieOptions",
    "MiddlewareOptions",
    "ReportGuard",
    "ResolvedOptions",
    "TrackingOptions",
]

DEFAULT_LATENCY_BUDGET = 0.15
#: Above this a budget is a unit mistake (``150`` meant as milliseconds), not a choice.
MAX_LATENCY_BUDGET = 60.0
DEFAULT_TRACKING_PREFIX = "/_personalize"

#: ``authorize(request)`` for the report: sync or async, truthy lets the request see it.
ReportGuard = Callable[["Request"], "bool | Awaitable[bool]"]

_SameSite = Literal["lax", "strict", "none"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheOptions:
    """The per-process experience cache. Times in seconds.

    ``ttl``: fresh; ``stale_while_revalidate``: after the TTL, served while one refresh
    runs; ``stale_if_error``: after the TTL, served when the upstream fails;
    ``maxsize``: identities kept (LRU/TTL bounded); ``max_concurrent_fetches``: upstream
    fetches in flight per process, beyond which a miss renders stale content or defaults.
    """

    ttl: float = DEFAULT_CACHE_TTL
    stale_while_revalidate: float = DEFAULT_STALE_WHILE_REVALIDATE
    stale_if_error: float = DEFAULT_STALE_IF_ERROR
    maxsize: int = DEFAULT_CACHE_MAXSIZE
    max_concurrent_fetches: int = DEFAULT_MAX_CONCURRENT_FETCHES


@dataclass(frozen=True, kw_only=True, slots=True)
class AttributeOptions:
    """The in-session attributes sent with every fetch (each is part of the cache key).

    ``day_of_week`` / ``time_of_day``: ``DAY_OF_THE_WEEK`` / ``TIME_OF_THE_DAY`` (UTC);
    ``user_agent``: ``USER_AGENT``; ``ip_address``: ``USER_IP_ADDRESS`` (through
    ``trusted_proxies``); ``query_params``: query parameters forwarded under their names.
    """

    day_of_week: bool = True
    time_of_day: bool = True
    user_agent: bool = True
    ip_address: bool = True
    query_params: Sequence[str] = DEFAULT_QUERY_PARAMS


@dataclass(frozen=True, kw_only=True, slots=True)
class CookieOptions:
    """The anonymous visitor cookie, with the options of Starlette's ``SessionMiddleware``.

    ``https_only``: ``None`` (default) marks it ``Secure`` when the request is https: the
    server's scheme, or ``X-Forwarded-Proto: https`` from one of ``trusted_proxies``;
    ``True`` always; ``False`` never. ``same_site="none"`` is always ``Secure`` (browsers
    refuse it otherwise). ``domain`` shares it with subdomains (``".example.com"``).
    """

    name: str = DEFAULT_VISITOR_COOKIE
    domain: str | None = None
    path: str = "/"
    same_site: _SameSite = "lax"
    https_only: bool | None = None
    max_age: int = DEFAULT_VISITOR_MAX_AGE


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackingOptions:
    """Impression and click tracking when the middleware builds its ``Tracking``.

    ``prefix``: where the beacon endpoint, the script and the report live;
    ``impressions``: ``"client"`` (seen ≥50 % for 1 s, by the script) or ``"server"``
    (counted at render time); ``allowed_origins``: origins whose beacons are accepted
    besides the request's own Host; ``token_ttl``: lifetime of a tracking token (s);
    ``bots``: ``"ignore"`` (known crawlers are not tracked) or ``"track"``; ``limits``:
    the human-timing rules and per visitor / per address rates (``TrackingLimits``);
    ``body_timeout``: seconds a beacon's body may take to arrive (408 after).
    """

    prefix: str = DEFAULT_TRACKING_PREFIX
    impressions: Literal["client", "server"] = "client"
    allowed_origins: Sequence[str] = ()
    token_ttl: float = DEFAULT_TOKEN_TTL
    bots: Literal["ignore", "track"] = "ignore"
    limits: TrackingLimits | None = None
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    #: ``False``: no hooks, no script, no beacon endpoint (``tracking=False`` does this).
    enabled: bool = True


#: What ``telemetry=`` takes: one ``Telemetry`` or several (``None``: nothing observes).
TelemetryArg = Telemetry | Sequence[Telemetry] | None


class MiddlewareOptions(TypedDict, total=False):
    """The keyword arguments of ``PersonalizeMiddleware`` (see the README's reference)."""

    settings: PersonalizeSettings | None
    backend: PersonalizeBackend | None
    local_experiences: str | PathLike[str] | None
    routes: RoutesConfig | None
    site_keys: Sequence[str]
    exclude_paths: Sequence[str]
    identify: IdentityResolver | None
    secret_key: str | Sequence[str] | None
    trusted_proxies: Sequence[str]
    latency_budget: float
    metadata_refresh: float | None
    cache: CacheOptions
    attributes: AttributeOptions
    cookie: CookieOptions
    tracking: bool | Tracking | TrackingOptions
    report: bool | ReportGuard | None
    shared: SharedLayer | None
    breaker: CircuitBreaker | None
    crawlers: Literal["personalize", "defaults"]
    preview: bool
    qa_cookies: bool
    debug_overlay: bool | None
    server_timing: bool
    telemetry: TelemetryArg
    client_limits: ClientLimits | None
    # The flat names of earlier releases (LEGACY_OPTIONS):
    cache_ttl: float
    stale_while_revalidate: float
    stale_if_error: float
    cache_maxsize: int
    max_concurrent_fetches: int
    query_params: Sequence[str]
    send_day_of_week: bool
    send_time_of_day: bool
    send_user_agent: bool
    send_ip_address: bool
    visitor_cookie: str
    tracking_prefix: str
    impressions: Literal["client", "server"]
    tracking_allowed_origins: Sequence[str]
    tracking_token_ttl: float
    local_report: bool | None


#: flat name of earlier releases -> (group option, field of its options object)
LEGACY_OPTIONS: Mapping[str, tuple[str, str]] = {
    "cache_ttl": ("cache", "ttl"),
    "stale_while_revalidate": ("cache", "stale_while_revalidate"),
    "stale_if_error": ("cache", "stale_if_error"),
    "cache_maxsize": ("cache", "maxsize"),
    "max_concurrent_fetches": ("cache", "max_concurrent_fetches"),
    "query_params": ("attributes", "query_params"),
    "send_day_of_week": ("attributes", "day_of_week"),
    "send_time_of_day": ("attributes", "time_of_day"),
    "send_user_agent": ("attributes", "user_agent"),
    "send_ip_address": ("attributes", "ip_address"),
    "visitor_cookie": ("cookie", "name"),
    "tracking_prefix": ("tracking", "prefix"),
    "impressions": ("tracking", "impressions"),
    "tracking_allowed_origins": ("tracking", "allowed_origins"),
    "tracking_token_ttl": ("tracking", "token_ttl"),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class ResolvedOptions:
    """Every option checked and normalised (what the middleware builds itself from)."""

    settings: PersonalizeSettings | None
    backend: PersonalizeBackend | None
    local_experiences: str | PathLike[str] | None
    routes: RoutesConfig | None
    site_keys: Sequence[str]
    exclude_paths: tuple[str, ...]
    identify: IdentityResolver | None
    secret_key: str | Sequence[str] | None
    trusted_proxies: Sequence[str]
    latency_budget: float
    metadata_refresh: float | None
    cache: CacheOptions
    attributes: AttributeOptions
    cookie: CookieOptions
    #: A ``Tracking`` the app built, or the options to build one with (maybe disabled).
    tracking: Tracking | TrackingOptions
    #: ``None``: in local mode only; ``True`` / ``False``; or a guard (on, guarded).
    report: bool | ReportGuard | None
    shared: SharedLayer | None
    breaker: CircuitBreaker | None
    #: ``"defaults"``: known crawlers get the defaults without an upstream call.
    crawlers: Literal["personalize", "defaults"] = "personalize"
    #: Developer tools (docs/preview.md): signed preview links, QA cookies, the overlay
    #: (``None``: in local mode), Server-Timing on every personalized response.
    preview: bool = False
    qa_cookies: bool = True
    debug_overlay: bool | None = None
    server_timing: bool = False
    #: What observes the middleware: a ``Telemetry`` or a list of them (``None``: nothing).
    telemetry: TelemetryArg = None
    #: Cache-miss fetches each client (address, identity) may start, per process.
    client_limits: ClientLimits | None = DEFAULT_CLIENT_LIMITS
