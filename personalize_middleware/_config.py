"""Connection settings for the MoEngage Personalize API."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import ConfigurationError

__all__ = [
    "DATA_CENTERS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DATA_CENTER",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_READ_TIMEOUT",
    "ENV_VARIABLES",
    "PersonalizeSettings",
    "describe_value",
    "invalid_option",
    "mask_secret",
    "positive_int",
    "positive_number",
]

DATA_CENTERS: tuple[str, ...] = ("01", "02", "03", "04", "05", "06", "101")
DEFAULT_DATA_CENTER = "01"
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_READ_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 100

_ENV_WORKSPACE_ID = "MOENGAGE_WORKSPACE_ID"
_ENV_API_SECRET = "MOENGAGE_API_SECRET"  # noqa: S105 - the variable's name, not a secret
_ENV_DATA_CENTER = "MOENGAGE_DATA_CENTER"
_ENV_BASE_URL = "MOENGAGE_BASE_URL"
_ENV_REDIS_URL = "MOENGAGE_REDIS_URL"
_ENV_EVENTS_OUTBOX = "MOENGAGE_EVENTS_OUTBOX"
#: Every variable ``from_env`` reads: setting any of them means "use MoEngage".
ENV_VARIABLES: tuple[str, ...] = (
    _ENV_WORKSPACE_ID,
    _ENV_API_SECRET,
    _ENV_DATA_CENTER,
    _ENV_BASE_URL,
    _ENV_REDIS_URL,
    _ENV_EVENTS_OUTBOX,
)
_MAX_SHOWN = 60

_WORKSPACE_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
#: One Redis, a Redis Cluster or a Sentinel-managed primary (``cache/redis/_urls.py``).
_REDIS_URL_RE = re.compile(r"^(rediss?(\+cluster|\+sentinel)?|unix)://", re.IGNORECASE)


def describe_value(value: Any) -> str:
    """A value as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def invalid_option(name: str, value: Any, expected: str) -> ConfigurationError:
    """The one-line error for a bad option: ``name=value: expected ...``."""
    return ConfigurationError(f"{name}={describe_value(value)}: expected {expected}", field=name)


def positive_number(name: str, value: Any) -> float:
    """``value`` as a float if it is a positive number; else a ConfigurationError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise invalid_option(name, value, "a positive number")
    return float(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an integer >= 1; else a ConfigurationError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid_option(name, value, "a positive integer")
    return value


def mask_secret(secret: str | None) -> str:
    """What a secret looks like in a repr or a log line: never its characters."""
    return "<unset>" if not secret else "********"


@dataclass(frozen=True, slots=True, kw_only=True)
class PersonalizeSettings:
    """Where and how to reach the MoEngage Personalize API.

    ``data_center`` picks ``https://sdk-{dc}.moengage.com/v1``; ``base_url`` overrides the
    whole base (tests, proxies, the local stand-in server). Timeouts are in seconds.
    ``redis_url`` turns on the shared Redis cache and workspace-wide rate limit.
    ``events_outbox`` says where accepted tracking events wait for delivery: ``"memory"``
    (lost with the process), ``"redis"`` (a stream in ``redis_url``'s Redis) or the path
    of a SQLite file; unset, ``"redis"`` when ``redis_url`` is set, else ``"memory"``.
    """

    workspace_id: str
    api_secret: str = field(repr=False)
    data_center: str = DEFAULT_DATA_CENTER
    base_url: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    redis_url: str | None = field(default=None, repr=False)
    events_outbox: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.workspace_id, str) or not _WORKSPACE_ID_RE.match(self.workspace_id):
            raise ConfigurationError(
                "workspace_id must be the MoEngage workspace id (letters, digits, '_' or '-')",
                field="workspace_id",
            )
        if not isinstance(self.api_secret, str) or not self.api_secret.strip():
            raise ConfigurationError("api_secret must be a non-empty string", field="api_secret")
        dc = str(self.data_center).strip()
        if dc.isdigit() and len(dc) == 1:
            dc = "0" + dc  # "1" -> "01": a common way to write it
        if dc not in DATA_CENTERS:
            raise ConfigurationError(
                f"data_center must be one of {', '.join(DATA_CENTERS)}, got {self.data_center!r}",
                field="data_center",
            )
        object.__setattr__(self, "data_center", dc)
        if self.base_url is not None:
            url = str(self.base_url).strip().rstrip("/")
            if not re.match(r"^https?://[^/\s]+", url):
                raise ConfigurationError(
                    f"base_url must be an http(s) URL, got {self.base_url!r}", field="base_url"
                )
            object.__setattr__(self, "base_url", url)
        positive_number("connect_timeout", self.connect_timeout)
        positive_number("read_timeout", self.read_timeout)
        positive_int("max_connections", self.max_connections)
        if self.redis_url is not None and not _REDIS_URL_RE.match(self.redis_url):
            raise ConfigurationError(
                "redis_url must start with redis://, rediss://, unix://, redis+cluster://, "
                "rediss+cluster://, redis+sentinel:// or rediss+sentinel://",
                field="redis_url",
            )
        outbox = self.events_outbox
        if outbox is not None:
            if not isinstance(outbox, str) or not outbox.strip() or "\x00" in outbox:
                raise ConfigurationError(
                    "events_outbox must be 'memory', 'redis' or the path of a SQLite file",
                    field="events_outbox",
                )
            if outbox == "redis" and not self.redis_url:
                raise ConfigurationError(
                    "events_outbox='redis' needs redis_url (MOENGAGE_REDIS_URL)",
                    field="events_outbox",
                )

    @property
    def api_base_url(self) -> str:
        """The base URL every endpoint path is appended to."""
        return self.base_url or f"https://sdk-{self.data_center}.moengage.com/v1"

    def __repr__(self) -> str:
        return (
            f"PersonalizeSettings(workspace_id={self.workspace_id!r}, "
            f"api_secret={mask_secret(self.api_secret)!r}, "
            f"api_base_url={self.api_base_url!r}, "
            f"connect_timeout={self.connect_timeout!r}, read_timeout={self.read_timeout!r}, "
            f"redis={'on' if self.redis_url else 'off'}, "
            f"events_outbox={self.events_outbox!r})"
        )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> PersonalizeSettings:
        """Read ``MOENGAGE_WORKSPACE_ID``, ``MOENGAGE_API_SECRET``, ``MOENGAGE_DATA_CENTER``,
        ``MOENGAGE_BASE_URL``, ``MOENGAGE_REDIS_URL`` and ``MOENGAGE_EVENTS_OUTBOX``;
        keyword overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for env_name, field_name in (
            (_ENV_WORKSPACE_ID, "workspace_id"),
            (_ENV_API_SECRET, "api_secret"),
            (_ENV_DATA_CENTER, "data_center"),
            (_ENV_BASE_URL, "base_url"),
            (_ENV_REDIS_URL, "redis_url"),
            (_ENV_EVENTS_OUTBOX, "events_outbox"),
        ):
            raw = env.get(env_name, "").strip()
            if raw:
                values[field_name] = raw
        values.update(overrides)
        for required, env_name in (
            ("workspace_id", _ENV_WORKSPACE_ID),
            ("api_secret", _ENV_API_SECRET),
        ):
            if required not in values:
                raise ConfigurationError(
                    f"{env_name} is not set (needed for {required}); for local mode, give "
                    "PersonalizeMiddleware no settings: it reads the environment itself",
                    field=required,
                )
        return cls(**values)

    @classmethod
    def from_env_if_configured(
        cls, environ: Mapping[str, str] | None = None
    ) -> PersonalizeSettings | None:
        """``from_env()`` when ``MOENGAGE_WORKSPACE_ID`` and ``MOENGAGE_API_SECRET`` are both
        set; ``None`` when no ``MOENGAGE_*`` variable is set (local mode). Anything in
        between is a half-configured production: a ``ConfigurationError`` naming what is
        missing, never a silent switch to local mode."""
        env = os.environ if environ is None else environ
        present = [name for name in ENV_VARIABLES if env.get(name, "").strip()]
        if not present:
            return None
        missing = [name for name in (_ENV_WORKSPACE_ID, _ENV_API_SECRET) if name not in present]
        if missing:
            raise ConfigurationError(
                f"{' and '.join(present)} {'is' if len(present) == 1 else 'are'} set but "
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: set "
                f"{_ENV_WORKSPACE_ID} and {_ENV_API_SECRET} to use MoEngage, or unset "
                f"{' and '.join(present)} for local mode",
                field=missing[0],
            )
        return cls.from_env(env)

    @staticmethod
    def env_has_credentials(environ: Mapping[str, str] | None = None) -> bool:
        """True when both ``MOENGAGE_WORKSPACE_ID`` and ``MOENGAGE_API_SECRET`` are set."""
        env = os.environ if environ is None else environ
        return bool(env.get(_ENV_WORKSPACE_ID, "").strip()) and bool(
            env.get(_ENV_API_SECRET, "").strip()
        )
