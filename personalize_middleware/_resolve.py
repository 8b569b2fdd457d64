"""``resolve_options``: every option of ``PersonalizeMiddleware`` checked in one place.

A mistake is a ``ConfigurationError`` of one line: the option as the app spelled it, the
value, and what is expected (``latency_budget='fast': expected a positive number of
seconds``). Unknown names get a "did you mean"; the flat names of earlier releases are
mapped onto their groups (``_options.LEGACY_OPTIONS``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from os import PathLike
from typing import Any, Literal, cast

from ._config import PersonalizeSettings, describe_value, invalid_option, positive_int
from ._exceptions import ConfigurationError
from ._interfaces import SharedLayer
from ._options import (
    DEFAULT_LATENCY_BUDGET,
    DEFAULT_TRACKING_PREFIX,
    LEGACY_OPTIONS,
    MAX_LATENCY_BUDGET,
    AttributeOptions,
    CacheOptions,
    CookieOptions,
    MiddlewareOptions,
    ReportGuard,
    ResolvedOptions,
    TrackingOptions,
)
from ._routes import RoutesConfig
from .cache import DEFAULT_CLIENT_LIMITS, ClientLimits
from .tracking import Tracking, TrackingLimits
from .upstream import DEFAULT_METADATA_REFRESH, CircuitBreaker, suggest_key

__all__ = ["resolve_options"]

_COOKIE_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DOMAIN_RE = re.compile(r"^\.?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
_PATH_RE = re.compile(r"^/[\x21-\x3a\x3c-\x7e]*$")  # printable, no ';', no space
_SAME_SITE = ("lax", "strict", "none")
_SameSite = Literal["lax", "strict", "none"]
_GROUPS: Mapping[str, type[Any]] = {
    "cache": CacheOptions,
    "attributes": AttributeOptions,
    "cookie": CookieOptions,
    "tracking": TrackingOptions,
}
_OPTIONS = tuple(MiddlewareOptions.__annotations__)


def resolve_options(options: Mapping[str, Any]) -> ResolvedOptions:
    """Check every option; ``ConfigurationError`` (one line: the option, the value, what
    is expected) on the first mistake."""
    for name, value in options.items():
        if name not in _OPTIONS:
            hint = suggest_key(name, list(_OPTIONS))
            raise ConfigurationError(
                f"{name}={describe_value(value)}: unknown option"
                + (f"; did you mean {hint}?" if hint else ""),
                field=name,
            )
    get = options.get
    settings = _instance("settings", get("settings"), PersonalizeSettings, "PersonalizeSettings")
    backend = get("backend")
    if backend is not None and not callable(getattr(backend, "fetch_experiences", None)):
        raise invalid_option("backend", backend, "a PersonalizeBackend (fetch_experiences, ...)")
    local_experiences = get("local_experiences")
    if local_experiences is not None and not isinstance(local_experiences, str | PathLike):
        raise invalid_option("local_experiences", local_experiences, "a .json/.yaml file path")
    if backend is not None and (settings is not None or local_experiences is not None):
        other = "settings" if settings is not None else "local_experiences"
        raise invalid_option(other, get(other), f"no {other} with backend= (backend wins)")
    if settings is not None and local_experiences is not None:
        raise invalid_option(
            "local_experiences", local_experiences, "no local file with settings= (MoEngage)"
        )
    groups = _groups(options)
    identify = get("identify")
    if identify is not None and not callable(identify):
        raise invalid_option("identify", identify, "a function (request) -> Identity | None")
    return ResolvedOptions(
        settings=settings,
        backend=backend,
        local_experiences=local_experiences,
        routes=_routes(get("routes")),
        site_keys=get("site_keys", ()),
        exclude_paths=_paths("exclude_paths", get("exclude_paths", ())),
        identify=identify,
        secret_key=get("secret_key"),
        trusted_proxies=get("trusted_proxies", ()),
        latency_budget=_latency_budget(get("latency_budget", DEFAULT_LATENCY_BUDGET)),
        metadata_refresh=_metadata_refresh(get("metadata_refresh", DEFAULT_METADATA_REFRESH)),
        cache=groups["cache"],
        attributes=groups["attributes"],
        cookie=groups["cookie"],
        tracking=groups["tracking"],
        report=_report(options),
        shared=_shared(get("shared")),
        breaker=_instance("breaker", get("breaker"), CircuitBreaker, "a CircuitBreaker"),
        crawlers=_crawlers(get("crawlers", "personalize")),
        preview=_flag("preview", get("preview", False)),
        qa_cookies=_flag("qa_cookies", get("qa_cookies", True)),
        debug_overlay=_flag("debug_overlay", get("debug_overlay"), optional=True),
        server_timing=_flag("server_timing", get("server_timing", False)),
        telemetry=get("telemetry"),  # checked where it is combined (telemetry/_wiring)
        client_limits=_client_limits(get("client_limits", DEFAULT_CLIENT_LIMITS)),
    )


def _client_limits(value: Any) -> ClientLimits | None:
    if value is not None and not isinstance(value, ClientLimits):
        raise invalid_option("client_limits", value, "ClientLimits(...) or None")
    return value


def _flag(name: str, value: Any, *, optional: bool = False) -> Any:
    if isinstance(value, bool) or (optional and value is None):
        return value
    raise invalid_option(name, value, "True or False" + (" (or None)" if optional else ""))


def _crawlers(value: Any) -> Literal["personalize", "defaults"]:
    if value not in ("personalize", "defaults"):
        raise invalid_option("crawlers", value, "'personalize' or 'defaults'")
    return value  # type: ignore[no-any-return]


# -- groups -----------------------------------------------------------------------------------


def _groups(options: Mapping[str, Any]) -> dict[str, Any]:
    """Each group's options object: given, built from flat names, or the defaults."""
    flat: dict[str, dict[str, tuple[str, Any]]] = {group: {} for group in _GROUPS}
    for name, (group, field) in LEGACY_OPTIONS.items():
        if name in options:
            flat[group][field] = (name, options[name])
    resolved: dict[str, Any] = {}
    for group, cls in _GROUPS.items():
        given = options.get(group)
        names = {field: f"{group}.{field}" for field in _fields(cls)}
        if group == "tracking" and not isinstance(given, TrackingOptions):
            resolved[group] = _tracking(given, flat[group])
            continue
        if given is None:
            given = cls()
        elif not isinstance(given, cls):
            raise invalid_option(group, given, f"{cls.__name__}(...)")
        elif flat[group]:
            _both(group, flat[group])
        if flat[group]:
            given = dataclasses.replace(given, **{f: v for f, (_, v) in flat[group].items()})
            names.update({f: name for f, (name, _) in flat[group].items()})
        resolved[group] = _CHECKS[group](given, names)
    return resolved


def _fields(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _both(group: str, flat: Mapping[str, tuple[str, Any]]) -> None:
    name, value = next(iter(flat.values()))
    raise invalid_option(name, value, f"either {name}= or {group}=, not both")


def _tracking(given: Any, flat: Mapping[str, tuple[str, Any]]) -> Tracking | TrackingOptions:
    if given is None or given is True or given is False:
        names = {field: f"tracking.{field}" for field in _fields(TrackingOptions)}
        names.update({f: name for f, (name, _) in flat.items()})
        built = _check_tracking(TrackingOptions(**{f: v for f, (_, v) in flat.items()}), names)
        # tracking=False keeps the options for their prefix (where the report lives).
        return built if given is not False else dataclasses.replace(built, enabled=False)
    if not isinstance(given, Tracking):
        raise invalid_option("tracking", given, "True, False, TrackingOptions(...) or Tracking")
    for field, (name, value) in flat.items():
        if field == "prefix" and value in (DEFAULT_TRACKING_PREFIX, given.prefix):
            continue
        raise ConfigurationError(
            f"{name}={describe_value(value)} differs from the Tracking object's "
            f"{field}: set it once, as Tracking({field}=...)",
            field=name,
        )
    return given


def _check_cache(options: CacheOptions, names: Mapping[str, str]) -> CacheOptions:
    _seconds(names["ttl"], options.ttl)
    for field in ("stale_while_revalidate", "stale_if_error"):
        value = getattr(options, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise invalid_option(names[field], value, "a number of seconds >= 0")
    positive_int(names["maxsize"], options.maxsize)
    positive_int(names["max_concurrent_fetches"], options.max_concurrent_fetches)
    return options


def _check_attributes(options: AttributeOptions, names: Mapping[str, str]) -> AttributeOptions:
    for field in ("day_of_week", "time_of_day", "user_agent", "ip_address"):
        _boolean(names[field], getattr(options, field))
    query = options.query_params
    if isinstance(query, str) or not isinstance(query, Collection):
        raise invalid_option(names["query_params"], query, "a list of query parameter names")
    for name in query:
        if not isinstance(name, str) or not name or not name.isprintable():
            raise invalid_option(names["query_params"], name, "query parameter names")
    return options


def _check_cookie(options: CookieOptions, names: Mapping[str, str]) -> CookieOptions:
    if not isinstance(options.name, str) or not _COOKIE_NAME_RE.match(options.name):
        raise invalid_option(names["name"], options.name, "a cookie name (letters, digits, _-.)")
    if options.domain is not None and (
        not isinstance(options.domain, str) or not _DOMAIN_RE.match(options.domain)
    ):
        raise invalid_option(names["domain"], options.domain, "None or a domain: '.example.com'")
    if not isinstance(options.path, str) or not _PATH_RE.match(options.path):
        raise invalid_option(names["path"], options.path, "a path starting with '/'")
    same_site = options.same_site.lower() if isinstance(options.same_site, str) else None
    if same_site not in _SAME_SITE:
        raise invalid_option(names["same_site"], options.same_site, "'lax', 'strict' or 'none'")
    if options.https_only is not None:
        _boolean(names["https_only"], options.https_only)
    if same_site == "none" and options.https_only is False:
        raise invalid_option(
            names["https_only"], False, "True or None with same_site='none' (browsers need Secure)"
        )
    positive_int(names["max_age"], options.max_age)
    return dataclasses.replace(options, same_site=cast("_SameSite", same_site))


def _check_tracking(options: TrackingOptions, names: Mapping[str, str]) -> TrackingOptions:
    prefix = options.prefix
    if (
        not isinstance(prefix, str)
        or not prefix.startswith("/")
        or prefix.endswith("/")
        or not _PATH_RE.match(prefix)
        or '"' in prefix
    ):
        raise invalid_option(
            names["prefix"], prefix, "a path starting with '/' and not ending with '/'"
        )
    if options.impressions not in ("client", "server"):
        raise invalid_option(names["impressions"], options.impressions, "'client' or 'server'")
    origins = options.allowed_origins
    if isinstance(origins, str) or not isinstance(origins, Collection):
        raise invalid_option(names["allowed_origins"], origins, "a list of origins")
    _seconds(names["token_ttl"], options.token_ttl)
    if options.bots not in ("ignore", "track"):
        raise invalid_option(names["bots"], options.bots, "'ignore' or 'track'")
    if options.limits is not None and not isinstance(options.limits, TrackingLimits):
        raise invalid_option(names["limits"], options.limits, "TrackingLimits(...) or None")
    _seconds(names["body_timeout"], options.body_timeout)
    _boolean(names["enabled"], options.enabled)
    return options


_CHECKS: Mapping[str, Callable[[Any, Mapping[str, str]], Any]] = {
    "cache": _check_cache,
    "attributes": _check_attributes,
    "cookie": _check_cookie,
    "tracking": _check_tracking,
}


# -- single options ---------------------------------------------------------------------------


def _instance(name: str, value: Any, cls: type[Any], expected: str) -> Any:
    if value is not None and not isinstance(value, cls):
        raise invalid_option(name, value, f"None or {expected}")
    return value


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise invalid_option(name, value, "True or False")


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise invalid_option(name, value, "a positive number of seconds")
    return float(value)


def _latency_budget(value: Any) -> float:
    seconds = _seconds("latency_budget", value)
    if seconds > MAX_LATENCY_BUDGET:
        raise invalid_option(
            "latency_budget", value, f"seconds, at most {MAX_LATENCY_BUDGET:g} (0.15 is 150 ms)"
        )
    return seconds


def _metadata_refresh(value: Any) -> float | None:
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise invalid_option("metadata_refresh", value, "None (off) or a positive number")
    return float(value)


def _routes(value: Any) -> RoutesConfig | None:
    if value is None or isinstance(value, Mapping):
        return value
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _routes_error(value)
    for item in value:  # pairs are accepted: [("/", ["hero-banner"])]
        if not isinstance(item, tuple | list) or len(item) != 2 or not isinstance(item[0], str):
            raise _routes_error(value)
    return value


def _routes_error(value: Any) -> ConfigurationError:
    return invalid_option(
        "routes", value, "a dict of path pattern -> list of keys, e.g. {'/': ['hero-banner']}"
    )


def _paths(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Collection):
        raise invalid_option(name, value, "a list of path prefixes such as ['/static']")
    for path in value:
        if not isinstance(path, str) or not path.startswith("/"):
            raise invalid_option(name, path, "path prefixes starting with '/'")
    return tuple(value)


def _report(options: Mapping[str, Any]) -> bool | ReportGuard | None:
    if "local_report" in options:
        if "report" in options:
            raise invalid_option(
                "local_report", options["local_report"], "either local_report= or report="
            )
        value = options["local_report"]
        name = "local_report"
    else:
        value = options.get("report")
        name = "report"
    if value is None or isinstance(value, bool) or callable(value):
        return value  # type: ignore[no-any-return]
    raise invalid_option(name, value, "None, True, False or an authorize(request) function")


def _shared(value: Any) -> SharedLayer | None:
    if value is not None and not callable(getattr(value, "coordinate", None)):
        raise invalid_option("shared", value, "None or a SharedLayer (RedisSharedLayer, ...)")
    return value  # type: ignore[no-any-return]
