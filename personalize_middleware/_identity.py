"""Who a request is for: the app's user, the session, or a signed anonymous visitor id."""

from __future__ import annotations

import inspect
import logging
import re
import secrets
from collections.abc import Mapping
from typing import Any

from starlette.requests import HTTPConnection, cookie_parser
from starlette.types import Scope

from ._context import header_text
from ._interfaces import IdentityResolver
from ._models import Identity
from ._proxies import TrustedProxies
from ._signing import Keyring

__all__ = [
    "DEFAULT_SESSION_IDENTIFIER_KEYS",
    "DEFAULT_VISITOR_COOKIE",
    "IdentityResolver",
    "VisitorCookie",
    "VisitorState",
    "call_resolver",
    "cookie_value",
    "default_identity",
    "resolve_identity",
    "session_identity",
]

logger = logging.getLogger("personalize_middleware")

DEFAULT_VISITOR_COOKIE = "pm_vid"
DEFAULT_VISITOR_MAX_AGE = 365 * 24 * 3600
DEFAULT_SESSION_IDENTIFIER_KEYS: Mapping[str, str] = {"u_em": "email", "u_mb": "mobile"}
_VISITOR_ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
_MAX_ID_LENGTH = 256
_VERIFIED_CACHE_SIZE = 16384


def _clean_id(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    cleaned: str = value.strip()
    if not cleaned or len(cleaned) > _MAX_ID_LENGTH or not cleaned.isprintable():
        return None
    return cleaned


def default_identity(conn: HTTPConnection) -> Identity | None:
    """The default resolver: an authenticated ``request.user`` (its ``identity``, else its
    ``display_name``), then the session's ``customer_id`` (and ``email`` / ``mobile`` as
    ``u_em`` / ``u_mb``). ``None`` means anonymous."""
    return session_identity(conn.scope)


def session_identity(scope: Scope) -> Identity | None:
    """``default_identity`` on the ASGI scope itself: synchronous, no ``HTTPConnection``
    (the middleware's fast path for the default resolver)."""
    user = scope.get("user")
    if user is not None and getattr(user, "is_authenticated", False):
        try:
            customer_id = _clean_id(user.identity)
        except (NotImplementedError, AttributeError):
            customer_id = _clean_id(getattr(user, "display_name", None))
        if customer_id:
            return Identity(customer_id=customer_id)
    session = scope.get("session")
    # ``is not None`` first: isinstance against an ABC is slow, and most apps have no session.
    if session is not None and isinstance(session, Mapping) and session:
        customer_id = _clean_id(session.get("customer_id"))
        identifiers = {
            api_name: cleaned
            for api_name, session_key in DEFAULT_SESSION_IDENTIFIER_KEYS.items()
            if (cleaned := _clean_id(session.get(session_key))) is not None
        }
        if customer_id or identifiers:
            return Identity(customer_id=customer_id, user_identifiers=identifiers or None)
    return None


async def call_resolver(resolver: IdentityResolver, conn: HTTPConnection) -> Identity | None:
    """Run a sync or async resolver; a broken resolver means anonymous, with a log line."""
    try:
        result = resolver(conn)
        if result is None:  # anonymous, the common case: skip the awaitable check
            return None
        if inspect.isawaitable(result):
            result = await result
    except Exception:
        logger.exception("personalize: the identity resolver failed; treating as anonymous")
        return None
    if result is not None and not isinstance(result, Identity):
        logger.error(
            "personalize: the identity resolver returned %s, not Identity; treating as anonymous",
            type(result).__name__,
        )
        return None
    if result is not None and result.customer_id is None and not result.user_identifiers:
        return None
    return result


def _cookie_value(header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (the last one wins).

    On the request path for every returning visitor, so plain splitting rather than
    ``SimpleCookie`` (about 20 µs a header); headers with quoted values (our own cookie
    never has one) go through Starlette's parser for its unquoting. Unlike
    ``SimpleCookie``, one malformed cookie of another site does not hide ours: browsers
    and Starlette's ``request.cookies`` read headers the same lenient way.
    """
    if '"' in header or "\\" in header:
        return cookie_parser(header).get(name)
    found: str | None = None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            found = value.strip()
    return found


#: Public name for the other cookies the middleware reads (preview and QA grants).
cookie_value = _cookie_value


class VisitorCookie:
    """The anonymous visitor id: random, in a signed, HttpOnly cookie (SameSite=Lax and
    ``Path=/`` unless configured otherwise; ``Domain`` only when given).

    ``Secure`` (``secure_for``): always with ``https_only=True`` or ``same_site="none"``,
    never with ``https_only=False``, else when the request is https, as the server saw
    it or as one of ``proxies`` says in ``X-Forwarded-Proto``.

    A cookie whose signature does not verify is ignored (a new id is issued), so one
    visitor cannot adopt another's id, and thereby their variations, by sending it.
    """

    __slots__ = (
        "_attributes",
        "_keyring",
        "_proxies",
        "_verified",
        "https_only",
        "max_age",
        "name",
    )

    def __init__(
        self,
        keyring: Keyring,
        *,
        name: str = DEFAULT_VISITOR_COOKIE,
        max_age: int = DEFAULT_VISITOR_MAX_AGE,
        domain: str | None = None,
        path: str = "/",
        same_site: str = "lax",
        https_only: bool | None = None,
        proxies: TrustedProxies | None = None,
    ) -> None:
        self._keyring = keyring
        self.name = name
        self.max_age = max_age
        self.https_only = True if same_site.lower() == "none" else https_only
        self._proxies = proxies or TrustedProxies()
        attributes = [f"Path={path}"]
        if domain:
            attributes.append(f"Domain={domain}")
        attributes += [f"Max-Age={max_age}", "HttpOnly", f"SameSite={same_site.capitalize()}"]
        self._attributes = "; ".join(attributes)
        # Cookie values already verified (the same string always verifies the same way):
        # a returning visitor costs a dict lookup instead of an HMAC. Bounded.
        self._verified: dict[str, tuple[str, bool]] = {}

    def read(self, cookie_header: str | None) -> tuple[str | None, bool]:
        """(visitor id, needs re-signing) from a Cookie header; ``(None, False)`` when absent
        or forged."""
        if not cookie_header or self.name not in cookie_header:
            return None, False
        value = _cookie_value(cookie_header, self.name)
        if value is None:
            return None, False
        known = self._verified.get(value)
        if known is not None:
            return known
        visitor_id, _, signature = value.rpartition(".")
        if not _VISITOR_ID_RE.match(visitor_id):
            return None, False
        index = self._keyring.verify("visitor", visitor_id.encode("ascii"), signature)
        if index is None:
            return None, False  # forgeries are not remembered: they cannot fill the cache
        result = (visitor_id, index > 0)
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[value] = result
        return result

    def new_id(self) -> str:
        return secrets.token_urlsafe(16)

    def secure_for(self, scope: Scope) -> bool:
        """Whether the cookie set on this request's response is ``Secure``."""
        if self.https_only is not None:
            return self.https_only
        return self._proxies.is_https(scope)

    def set_cookie_header(self, visitor_id: str, *, secure: bool) -> bytes:
        value = f"{visitor_id}.{self._keyring.sign('visitor', visitor_id.encode('ascii'))}"
        header = f"{self.name}={value}; {self._attributes}"
        if secure:
            header += "; Secure"
        return header.encode("latin-1")


class VisitorState:
    """One request's visitor: the id resolved from (or issued for) the visitor cookie,
    and whether the response must set the cookie."""

    __slots__ = ("cookie_header", "set_cookie", "visitor_id")

    def __init__(self) -> None:
        self.set_cookie = False
        self.visitor_id: str | None = None
        #: The Cookie header, once read (by the developer tools' check), else ``UNREAD``.
        self.cookie_header: str | None = UNREAD


async def resolve_identity(
    identify: IdentityResolver,
    cookie: VisitorCookie,
    scope: Scope,
    visitor: VisitorState,
    *,
    issue: bool = True,
) -> Identity:
    """Who the request is: the resolver's identity, else the visitor of the signed cookie
    (a new one when there is none or it is forged; ``issue``: the response sets it).
    ``visitor`` records the visitor id and whether to set the cookie."""
    identity = await call_resolver(identify, HTTPConnection(scope))
    if identity is not None:
        return identity
    header = visitor.cookie_header
    if header is UNREAD:
        header = header_text(scope, b"cookie")
    visitor_id, resign = cookie.read(header)
    if visitor_id is None:
        visitor_id = cookie.new_id()
        resign = issue
    visitor.set_cookie = resign
    visitor.visitor_id = visitor_id
    return Identity(visitor_id=visitor_id)


#: ``VisitorState.cookie_header`` before anything read the header.
UNREAD: Any = object()
