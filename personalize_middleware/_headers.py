"""Response headers of personal responses: no cache may store them.

``ResponseGate`` is the middleware's send wrapper. A response is personal when the page
read experiences, asked for the identity or the render id (``Personalization.used``), had
the visitor cookie issued, or streams its body. A page may read experiences after it
handed over its ``http.response.start`` (lazily, in a streamed body), so unless the
response is already known to be personal the start is held until the next message, which
the app sends in the same breath (a whole body: ``Response``) or with its first chunk:

- a whole body (``more_body`` false) or ``http.response.pathsend``: everything the page
  read is known; personal or not, the start goes out with the body.
- a streamed body (``more_body`` true): private, whatever it read so far, since later
  chunks may still read experiences. Paths in ``exclude_paths`` never get here.
- the app returns without a body: the start goes out then; the app raises: the start is
  dropped, so the error middleware outside can still answer 500.

Every other message (trailers, unknown extensions) passes through unchanged and in order.
Headers are read as comma-separated tokens, never by substring: ``x-no-store`` is not
``no-store`` and ``X-Cookie-Consent`` is not ``Cookie``.

What a personal response leaves with (README, "CDNs and shared caches"):

- ``Cache-Control: private, no-store``, replacing every ``Cache-Control`` line the app
  sent. Only ``no-transform`` is carried over (it is about proxies rewriting the body,
  not about storing it). Everything else goes: ``public``, ``max-age``, ``s-maxage``,
  ``immutable``, ``stale-*`` allow storing or reuse; ``must-understand`` lets a cache
  that knows the status code ignore ``no-store``; ``private="Set-Cookie"`` and
  ``no-cache="..."`` with a field list allow storing the rest of the response; and
  ``no-cache``/``must-revalidate`` say nothing once ``no-store`` is there.
- ``Vary`` gains a ``Cookie`` token, unless a ``Cookie`` or ``*`` token is already
  there; several ``Vary`` lines are joined into one (some caches read only the first).
- The headers that override ``Cache-Control`` for one kind of cache are removed:
  ``CDN-Cache-Control`` and every ``*-CDN-Cache-Control`` (RFC 9213, e.g.
  ``Cloudflare-CDN-Cache-Control``), ``Surrogate-Control`` (Fastly prefers it to
  ``Cache-Control``; Cloudflare documents ignoring ``Cache-Control`` when it is there),
  ``Edge-Control`` (Akamai; its ``!no-store`` overrides ``no-store``) and
  ``X-Accel-Expires`` (nginx's proxy cache gives it priority over ``Cache-Control``).
  Removed rather than set to ``no-store``: without them each of those caches falls back
  to ``Cache-Control``, one header with a standard meaning, whereas what each vendor
  does with ``no-store`` in its own header is not the same everywhere.
- The visitor cookie (``Set-Cookie``), when one is issued.

Every other header stays, unchanged and in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.types import Message, Scope, Send

if TYPE_CHECKING:
    from ._identity import VisitorCookie, VisitorState
    from ._personalization import Personalization

__all__ = ["ResponseGate", "cache_directives", "make_private", "vary_tokens"]

_CACHE_CONTROL = b"cache-control"
_VARY = b"vary"
_PRIVATE = b"private, no-store"
_PRIVATE_NO_TRANSFORM = b"private, no-store, no-transform"
# Per-cache overrides of Cache-Control; any "<cdn>-cdn-cache-control" too (RFC 9213).
_OVERRIDES = frozenset(
    {b"cdn-cache-control", b"surrogate-control", b"edge-control", b"x-accel-expires"}
)
_TARGETED_SUFFIX = b"-cdn-cache-control"
_RELATED = _OVERRIDES | {_CACHE_CONTROL, _VARY}
_OWS = b" \t"

logger = logging.getLogger("personalize_middleware")


class ResponseGate:
    """The send wrapper of one request: makes its response private when it is personal
    (the module's docstring says when and how)."""

    __slots__ = ("_cookie", "_handle", "_scope", "_send", "_visitor", "held")
    _told_streamed = False  # one warning per process about streamed responses

    def __init__(
        self,
        send: Send,
        handle: Personalization,
        visitor: VisitorState,
        cookie: VisitorCookie,
        scope: Scope,
    ) -> None:
        self._send = send
        self._handle = handle
        self._visitor = visitor
        self._cookie = cookie
        self._scope = scope
        #: The ``http.response.start`` message waiting for the next one, if any.
        self.held: Message | None = None

    async def send(self, message: Message) -> None:
        held = self.held
        if held is not None:  # released with the next message, in the same call
            self.held = None
            self._decorate(held, bool(message.get("more_body")))
            await self._send(held)
        elif message["type"] == "http.response.start":
            if not self._handle.used and not self._visitor.set_cookie:
                self.held = message  # not personal yet: wait for the body
                return
            self._decorate(message, False)
        await self._send(message)

    async def finish(self) -> None:
        """After the app returned (if ``held``): a start sent without a body goes now."""
        held, self.held = self.held, None
        if held is not None:
            self._decorate(held, False)
            await self._send(held)

    def _decorate(self, message: Message, streamed: bool) -> None:
        visitor = self._visitor
        if not self._handle.used and not visitor.set_cookie:
            if not streamed:
                return  # did not depend on the visitor: the app's headers stand
            if not ResponseGate._told_streamed and not _already_private(message):
                ResponseGate._told_streamed = True
                logger.warning(
                    "personalize: a streamed response (%s) was made private, since its "
                    "later chunks could still read experiences; if that path never "
                    "depends on the visitor (static files, public feeds), add its prefix "
                    "to exclude_paths (logged once)",
                    self._scope.get("path"),
                )
        cookie = None
        if visitor.set_cookie and visitor.visitor_id is not None:
            secure = self._cookie.secure_for(self._scope)
            cookie = self._cookie.set_cookie_header(visitor.visitor_id, secure=secure)
        make_private(message, set_cookie=cookie)
        tools = self._handle.devtools
        if tools is not None and self._handle.used:
            tools.decorate(message, self._handle)  # Server-Timing


def make_private(message: Message, *, set_cookie: bytes | None = None) -> None:
    """Make the ``http.response.start`` ``message`` uncacheable by any shared or private
    cache (see the module's docstring) and add ``set_cookie`` as a ``Set-Cookie``."""
    # Plain lists, no MutableHeaders: this runs for every personal page. Usually none of
    # the headers concerned is there: one pass to see that, then appends to a copy (the
    # app's list may be a Response's own, sent again).
    original = message.get("headers", ())
    if not isinstance(original, list | tuple):  # any iterable, says ASGI: read it once
        original = list(original)
    for key, _ in original:
        name = key.lower()  # ASGI says lower-case; a raw app may not
        if name in _RELATED or name.endswith(_TARGETED_SUFFIX):
            headers = _rewritten(original)
            break
    else:
        headers = list(original)
        headers.append((_CACHE_CONTROL, _PRIVATE))
        headers.append((_VARY, b"Cookie"))
    if set_cookie is not None:
        headers.append((b"set-cookie", set_cookie))
    message["headers"] = headers


def _rewritten(original: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    no_transform = False
    vary_at = -1
    vary: list[bytes] = []
    for key, value in original:
        name = key.lower()
        if name == _CACHE_CONTROL:
            if not no_transform:
                no_transform = _has_no_transform(value)
        elif name == _VARY:
            if vary_at < 0:
                vary_at = len(headers)
                headers.append((key, value))
            vary.append(value)
        elif name not in _OVERRIDES and not name.endswith(_TARGETED_SUFFIX):
            headers.append((key, value))
    headers.append((_CACHE_CONTROL, _PRIVATE_NO_TRANSFORM if no_transform else _PRIVATE))
    if vary_at < 0:
        headers.append((_VARY, b"Cookie"))
    else:
        has_cookie = any(_varies_on_cookie(value) for value in vary)
        if not has_cookie or len(vary) > 1:  # one line: some caches read only the first
            joined = b", ".join(v for value in vary if (v := value.strip(_OWS)))
            if not has_cookie:
                joined = joined + b", Cookie" if joined else b"Cookie"
            headers[vary_at] = (_VARY, joined)
    return headers


def cache_directives(value: bytes) -> list[tuple[bytes, bytes | None]]:
    """The directives of a ``Cache-Control`` (or ``CDN-Cache-Control``) field value, in
    order: ``(name, argument)`` with the name lower-cased and the argument unquoted
    (``None`` when there is none). RFC 9111 syntax: ``#( token [ "=" ( token /
    quoted-string ) ] )``; a comma inside a quoted argument does not split, and a name
    that is not one token (``no-store x``) is kept whole so it matches nothing."""
    directives: list[tuple[bytes, bytes | None]] = []
    i, n = 0, len(value)
    while i < n:
        # The name runs to "=" or ",".
        j = i
        while j < n and value[j] not in b"=,":
            j += 1
        name = value[i:j].strip(_OWS).lower()
        argument: bytes | None = None
        if j < n and value[j] == 0x3D:  # "="
            j += 1
            while j < n and value[j] in _OWS:
                j += 1
            if j < n and value[j] == 0x22:  # '"': a quoted-string, "\" escapes
                j += 1
                parts = bytearray()
                while j < n and value[j] != 0x22:
                    if value[j] == 0x5C and j + 1 < n:  # "\"
                        j += 1
                    parts.append(value[j])
                    j += 1
                argument = bytes(parts)
                j += 1  # the closing quote
                while j < n and value[j] != 0x2C:  # anything after it, up to ","
                    j += 1
            else:
                k = j
                while j < n and value[j] != 0x2C:
                    j += 1
                argument = value[k:j].strip(_OWS)
        if name:
            directives.append((name, argument))
        i = j + 1  # past the ","
    return directives


def vary_tokens(value: bytes) -> list[bytes]:
    """The field names of a ``Vary`` value, lower-cased (``*`` stays ``*``)."""
    return [token for part in value.split(b",") if (token := part.strip(_OWS).lower())]


def _has_no_transform(value: bytes) -> bool:
    if b"no-transform" not in value.lower():  # cheap pre-check; the tokens decide
        return False
    return any(name == b"no-transform" for name, _ in cache_directives(value))


def _already_private(message: Message) -> bool:
    """Whether the app itself forbade shared caching (``private`` or ``no-store``)."""
    return any(
        name in (b"private", b"no-store")
        for key, value in message.get("headers", ())
        if key.lower() == _CACHE_CONTROL
        for name, _ in cache_directives(value)
    )


def _varies_on_cookie(value: bytes) -> bool:
    return any(token in (b"cookie", b"*") for token in vary_tokens(value))
