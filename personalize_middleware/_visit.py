"""A request's *visit*: its in-session attributes, whether it is fetched for, and the
returning visitor's identity and query, worked out once per distinct set of headers.

Everything here is a pure function of a few request values: the ``Cookie`` header (the
signed visitor id), ``User-Agent``, ``X-Forwarded-For``, the peer's address, the query
string and the UTC hour (``DAY_OF_THE_WEEK`` / ``TIME_OF_THE_DAY``). A browser sends the
same ones on every page, so the middleware keys a bounded memo on exactly those values
and, on a repeat, skips the header parsing, the attribute building, the cookie split and
the ``FetchQuery`` (its sorted context key): the cache-hit path's own work drops to a
tuple hash and a dict lookup.

Why this is safe: the key holds every input the cached values are computed from, byte
for byte, so two requests share an entry only when they would compute the same values.
The visitor id comes from a cookie whose signature was verified when the entry was made
(a forged cookie verifies the same way every time, and is never remembered as a
visitor); an identity from the session or an authenticated user is never taken from the
memo (``session_identity`` runs for every request and wins); a new visitor (no valid
cookie) gets a fresh random id per request, never a memoised one. The attributes are
shared read-only (``MappingProxyType``).

Bounded in entries and in key size (``MAX_KEY_BYTES``); two generations, so a visitor
seen in the last ``maxsize`` distinct visits is kept when the newer generation fills.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from starlette.types import Scope

from ._context import SessionAttributes, header_text
from ._identity import VisitorCookie
from ._models import FetchQuery, Identity
from .tracking import is_bot

__all__ = ["MAX_KEY_BYTES", "Visit", "VisitMemo"]

#: Requests whose memo key (headers and query string) is longer are not remembered.
MAX_KEY_BYTES = 4096
DEFAULT_MEMO_SIZE = 2048

_Key = tuple[Any, ...]


class Visit:
    """What a request's headers say, computed once per distinct headers (read-only)."""

    __slots__ = ("attributes", "cookie_header", "fetch", "query", "user_agent", "visitor_id")

    def __init__(
        self,
        attributes: Mapping[str, str],
        user_agent: str | None,
        fetch: bool,
        cookie_header: str | None,
        visitor_id: str | None,
        query: FetchQuery | None,
    ) -> None:
        #: The in-session attributes sent to MoEngage (and part of the cache key).
        self.attributes = attributes
        #: The User-Agent (crawler checks), also when it is not sent.
        self.user_agent = user_agent
        #: False for a known crawler when crawlers get the defaults (no upstream call).
        self.fetch = fetch
        #: The ``Cookie`` header as text (``None`` if absent).
        self.cookie_header = cookie_header
        #: The verified visitor id from the signed cookie, when it needs no re-signing.
        self.visitor_id = visitor_id
        #: The returning visitor's query (``visitor_id`` + ``attributes``), else ``None``.
        self.query = query


class VisitMemo:
    """Builds ``Visit``s and remembers the last ``maxsize`` to ``2 * maxsize`` of them."""

    __slots__ = (
        "_attributes",
        "_clock",
        "_cookie",
        "_crawler_defaults",
        "_needs_user_agent",
        "_new",
        "_old",
        "maxsize",
    )

    def __init__(
        self,
        attributes: SessionAttributes,
        cookie: VisitorCookie,
        *,
        crawler_defaults: bool,
        needs_user_agent: bool,
        maxsize: int = DEFAULT_MEMO_SIZE,
    ) -> None:
        self._attributes = attributes
        self._clock: Callable[[], float] = attributes.clock
        self._cookie = cookie
        self._crawler_defaults = crawler_defaults
        self._needs_user_agent = needs_user_agent or crawler_defaults
        self.maxsize = maxsize
        self._new: dict[_Key, Visit] = {}
        self._old: dict[_Key, Visit] = {}

    def __len__(self) -> int:
        return len(self._new) + len(self._old)

    def clear(self) -> None:
        self._new, self._old = {}, {}

    def visit(self, scope: Scope) -> Visit:
        """The request's visit: remembered, or built now (and remembered if small)."""
        cookie: bytes | None = None
        user_agent: bytes | None = None
        forwarded: bytes | None = None
        repeated = False
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                repeated |= cookie is not None
                cookie = value if cookie is None else cookie
            elif name == b"user-agent":
                repeated |= user_agent is not None
                user_agent = value
            elif name == b"x-forwarded-for":
                forwarded = value if forwarded is None else forwarded + b"," + value
        client = scope.get("client")
        key = (
            cookie,
            user_agent,
            forwarded,
            client[0] if client else None,
            scope.get("query_string"),
            int(self._clock() // 3600),
        )
        found = self._new.get(key)
        if found is not None:
            return found
        found = self._old.get(key)
        if found is None:
            found = self._build(scope, cookie)
            if repeated or _size(key) > MAX_KEY_BYTES:
                return found  # repeated headers are read elsewhere as first / last: rare
        if len(self._new) >= self.maxsize:
            self._old, self._new = self._new, {}
        self._new[key] = found
        return found

    def _build(self, scope: Scope, raw_cookie: bytes | None) -> Visit:
        attributes = self._attributes.build(scope)
        user_agent = attributes.get("USER_AGENT")
        if user_agent is None and self._needs_user_agent:
            user_agent = header_text(scope, b"user-agent")
        fetch = not (self._crawler_defaults and user_agent and is_bot(user_agent))
        shared = MappingProxyType(attributes)
        cookie_header = raw_cookie.decode("latin-1") if raw_cookie is not None else None
        visitor_id, resign = self._cookie.read(cookie_header)
        query = None
        if visitor_id is not None and not resign:
            query = FetchQuery(Identity(visitor_id=visitor_id), shared)
        else:
            visitor_id = None  # re-signed or new: worked out per request
        return Visit(shared, user_agent, fetch, cookie_header, visitor_id, query)


def _size(key: _Key) -> int:
    return sum(len(part) for part in key[:3] if part is not None) + len(key[4] or b"")
