"""In-session attributes forwarded to the Fetch Experience API, and who is asking.

Every attribute sent is part of the cache key (``FetchQuery``): the answer may depend on
any of them, so keying on less than is sent could serve one context's variation to another.
What an attacker controls is therefore bounded before it is sent (docs/fair-budget.md):

- a query parameter's value is sent only if it is 1-64 characters of ``A-Z a-z 0-9``,
  space and ``. _ ~ - + | / : ,`` (after %-decoding); any other value is dropped, as if
  the link did not carry it (truncating or replacing characters would send a value no
  campaign uses, and could turn one campaign's value into another's);
- the User-Agent is sent as received, cut to 512 characters, with characters outside
  printable ASCII removed. It is not reduced to a class: MoEngage derives device
  targeting from it, a class the cache keyed on while the full header was sent could
  serve a variation chosen for another User-Agent, and one identity has one browser, so
  a class would add no cache hits for real visitors.

Neither bounds how MANY distinct values a client can send; the per-client fetch limits
(``cache._fairness``) bound what that costs, keyed by ``client_key``.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl

from starlette.types import Scope

from ._exceptions import ConfigurationError

__all__ = ["DEFAULT_QUERY_PARAMS", "SessionAttributes", "header_text"]

DEFAULT_QUERY_PARAMS: tuple[str, ...] = ("utm_source", "utm_medium", "utm_campaign")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_HOURS = tuple(f"{h:02d}" for h in range(24))
_MAX_USER_AGENT = 512
#: A query value worth sending: what campaign tags are made of, bounded (module docstring).
_QUERY_VALUE = re.compile(r"[A-Za-z0-9 ._~+|/:,\-]{1,64}")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]+")

logger = logging.getLogger("personalize_middleware")

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
        "_warned_proxy",
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
        self._warned_proxy = False

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
                user_agent = _clean_user_agent(user_agent)
                if user_agent:
                    attrs["USER_AGENT"] = user_agent
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
                if _QUERY_VALUE.fullmatch(value):
                    attrs[name] = value

    def client_key(self, scope: Scope) -> str | None:
        """The address the per-client fetch limits count this request under (never sent);
        ``None`` when there is none to count by.

        The client IP as ``USER_IP_ADDRESS`` has it, except where that address stands for
        many visitors at once. A trusted proxy's own address (it forwarded no client) is
        ``None``. A peer that is neither public nor trusted, carrying ``X-Forwarded-For``,
        is a proxy nobody listed in ``trusted_proxies``: counting by it would put every
        visitor in one bucket, so the right-most forwarded address (the one that proxy
        appended) counts instead, and a warning says to set ``trusted_proxies`` (forging
        it helps only a client that can reach the app from a private network, and only to
        escape the limit). Without that header, a loopback peer is a local proxy or tool
        that every visitor shares, or a test client: ``None``."""
        _, forwarded = _headers(scope)
        ip = self._client_ip(scope, forwarded)
        if ip is None or self._trusted(ip):
            return None
        client = scope.get("client")
        if _is_public(ip) or not client or str(client[0]) != ip:
            return ip  # a public peer, or resolved through a trusted proxy
        candidate = forwarded.rpartition(",")[2].strip() if forwarded else ""
        if not _is_ip(candidate):
            return None if _is_loopback(ip) else ip
        if not self._warned_proxy:
            self._warned_proxy = True
            logger.warning(
                "personalize: requests from %s carry X-Forwarded-For, but that address is "
                "not in trusted_proxies: USER_IP_ADDRESS is the proxy's address for every "
                "visitor. Set trusted_proxies to the proxy's address or network.",
                ip,
            )
        return candidate

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


@functools.lru_cache(maxsize=4096)  # browsers repeat: the check costs more than the lookup
def _clean_user_agent(user_agent: str) -> str:
    if len(user_agent) <= _MAX_USER_AGENT and user_agent.isascii() and user_agent.isprintable():
        return user_agent
    return _NOT_PRINTABLE_ASCII.sub("", user_agent)[:_MAX_USER_AGENT]


@functools.lru_cache(maxsize=4096)
def _is_public(text: str) -> bool:
    return ipaddress.ip_address(text).is_global


def _is_loopback(text: str) -> bool:
    return ipaddress.ip_address(text).is_loopback


def header_text(scope: Scope, name: bytes) -> str | None:
    """The first ``name`` header of the request, as text (latin-1, as HTTP has it)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


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
