"""In-session attributes forwarded to the Fetch Experience API."""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl

from starlette.types import Scope

from ._exceptions import ConfigurationError

__all__ = ["DEFAULT_QUERY_PARAMS", "SessionAttributes"]

DEFAULT_QUERY_PARAMS: tuple[str, ...] = ("utm_source", "utm_medium", "utm_campaign")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_HOURS = tuple(f"{h:02d}" for h in range(24))
_MAX_VALUE = 256
_MAX_USER_AGENT = 512

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SessionAttributes:
    """Builds the in-session attributes of a request.

    ``DAY_OF_THE_WEEK`` and ``TIME_OF_THE_DAY`` are UTC, as the API wants. The client IP is
    the socket peer's, or, only when that peer is a trusted proxy, the right-most address
    of ``X-Forwarded-For`` that is not itself a trusted proxy. Every value that is sent is
    also part of the cache key, so sending fewer attributes means more cache hits.
    """

    __slots__ = (
        "_hour",
        "_hour_values",
        "clock",
        "day_of_week",
        "ip_address",
        "query_params",
        "time_of_day",
        "trusted_proxies",
        "user_agent",
    )

    def __init__(
        self,
        *,
        day_of_week: bool = True,
        time_of_day: bool = True,
        user_agent: bool = True,
        ip_address: bool = True,
        query_params: Sequence[str] = DEFAULT_QUERY_PARAMS,
        trusted_proxies: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(query_params, str):
            raise ConfigurationError("query_params must be a list of names", field="query_params")
        for name in query_params:
            if not isinstance(name, str) or not name or not name.isprintable():
                raise ConfigurationError(f"bad query parameter name {name!r}", field="query_params")
        networks: list[_Network] = []
        for proxy in trusted_proxies:
            try:
                networks.append(ipaddress.ip_network(proxy, strict=False))
            except ValueError as exc:
                raise ConfigurationError(
                    f"trusted_proxies: {proxy!r} is not an IP address or network",
                    field="trusted_proxies",
                ) from exc
        self.day_of_week = day_of_week
        self.time_of_day = time_of_day
        self.user_agent = user_agent
        self.ip_address = ip_address
        self.query_params = frozenset(query_params)
        self.trusted_proxies = tuple(networks)
        self.clock = clock
        self._hour = -1
        self._hour_values = ("", "")

    def _day_and_hour(self) -> tuple[str, str]:
        # Both change only on the hour (Unix time has no leap seconds), so gmtime runs
        # once an hour instead of on every request.
        hour = int(self.clock() // 3600)
        if hour != self._hour:
            now = time.gmtime(hour * 3600)
            self._hour_values = (_DAYS[now.tm_wday], _HOURS[now.tm_hour])
            self._hour = hour
        return self._hour_values

    def build(self, scope: Scope) -> dict[str, str]:
        attrs: dict[str, str] = {}
        if self.day_of_week or self.time_of_day:
            day, hour = self._day_and_hour()
            if self.day_of_week:
                attrs["DAY_OF_THE_WEEK"] = day
            if self.time_of_day:
                attrs["TIME_OF_THE_DAY"] = hour
        if self.user_agent or (self.ip_address and self.trusted_proxies):
            user_agent, forwarded = _headers(scope)
            if self.user_agent and user_agent:
                attrs["USER_AGENT"] = user_agent[:_MAX_USER_AGENT]
        else:
            forwarded = None
        if self.ip_address:
            ip = self._client_ip(scope, forwarded)
            if ip:
                attrs["USER_IP_ADDRESS"] = ip
        if self.query_params and scope.get("query_string"):
            self._add_query(scope["query_string"], attrs)
        return attrs

    def _add_query(self, raw: bytes, attrs: dict[str, str]) -> None:
        try:
            text = raw.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            return
        # latin-1 throughout, then UTF-8 once: parse_qsl's own UTF-8 decoding turns a bad
        # escape such as %a0 into U+FFFD, which latin-1 cannot encode (a 500 for every
        # page reached through such a link).
        for raw_name, raw_value in parse_qsl(text, keep_blank_values=False, encoding="latin-1"):
            name = raw_name.encode("latin-1").decode("utf-8", "replace")
            if name in self.query_params and name not in attrs:
                value = raw_value.encode("latin-1").decode("utf-8", "replace")
                if value.isprintable():
                    attrs[name] = value[:_MAX_VALUE]

    def client_ip(self, scope: Scope) -> str | None:
        """The client's address: the peer, or what trusted proxies forwarded for it."""
        _, forwarded = _headers(scope) if self.trusted_proxies else (None, None)
        return self._client_ip(scope, forwarded)

    def _client_ip(self, scope: Scope, forwarded: str | None) -> str | None:
        client = scope.get("client")
        peer: str | None = str(client[0]) if client else None
        if peer is not None and not _is_ip(peer):
            # "testclient" (Starlette's TestClient) or a server's socket path: the API
            # would refuse the whole fetch with a 400 for a USER_IP_ADDRESS like that.
            peer = None
        if not peer or not self.trusted_proxies or not self._trusted(peer):
            return peer
        if not forwarded:
            return peer
        for candidate in reversed([part.strip() for part in forwarded.split(",")]):
            if not candidate:
                continue
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                return peer  # garbage in the header: do not trust any of it
            if not self._trusted(candidate):
                return candidate
        return peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)


@functools.lru_cache(maxsize=4096)  # peers repeat: keep the parse off the hot path
def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _headers(scope: Scope) -> tuple[str | None, str | None]:
    user_agent: str | None = None
    forwarded: str | None = None
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            user_agent = value.decode("latin-1")
        elif name == b"x-forwarded-for":
            forwarded = (
                value.decode("latin-1")
                if forwarded is None
                else forwarded + "," + value.decode("latin-1")
            )
    return user_agent, forwarded
