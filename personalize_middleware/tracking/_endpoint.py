"""The beacon endpoint: ``POST {prefix}/events`` and ``GET {prefix}/personalize.<hash>.js``.

A beacon is ``{"events": ["<token>", ...]}`` (at most ``max_events`` tokens), or, for
hooks that wrote an index, ``{"events": ["~3", ...], "page": "<manifest>"}`` (``_pages``;
the two mix). It is
accepted (204) only when it comes from the page's own origin, fits in ``max_body`` bytes,
arrives whole within ``body_timeout`` seconds, and *every* token verifies for the visitor
sending it; otherwise nothing of it is forwarded (400 malformed, 403 forged / expired /
another visitor's / cross-site, 408 too slow, 413 too large). Errors of our own are
logged and answered 400: this endpoint never answers 500.

A verified beacon's events then pass the human checks, one by one (``_guard``): a
replay is dropped, an event sooner after the page's render than a person could see or
click is dropped and burnt (remembered as seen), one over a rate is dropped; the rest go
to the ``EventRecorder``, which counts and stores them: 204 is answered once they are
stored (in a durable outbox: written), 503 when the outbox could not store them. A known
crawler's beacon (``bots="ignore"``) is not read at all. Dropped events are still
answered 204: an answer that told a script which rule it broke would teach it. Answers
are ``starlette.responses.Response`` objects.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from starlette.responses import PlainTextResponse, Response

from .._exceptions import InvalidTokenError
from .._logging import RateLimitedLog
from .._models import Identity
from .._signing import Keyring
from ._bots import is_bot
from ._guard import EventGuard, address_key
from ._pages import decode_events
from ._recorder import EventRecorder, TrackingStats
from ._tokens import TrackingToken

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

__all__ = ["BeaconEndpoint", "EndpointPaths"]

logger = logging.getLogger("personalize_middleware.tracking")

_SCRIPT_IMMUTABLE = "public, max-age=31536000, immutable"
_SCRIPT_SHORT = "public, max-age=300"
_ALLOWED_FETCH_SITES = frozenset({b"same-origin", b"none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_VISITOR_KEY = 128


@dataclass(frozen=True, slots=True)
class EndpointPaths:
    """The URLs the endpoint answers, under the tracking prefix."""

    prefix: str
    events: str
    script: str

    @property
    def script_alias(self) -> str:
        """The script's unversioned URL (short cache lifetime)."""
        return self.prefix + "/personalize.js"


class _Disconnected(Exception):
    pass


class BeaconEndpoint:
    """The ASGI side of tracking: verifies beacons with ``keyring``, passes their events
    through ``guard`` and hands them to ``recorder``; serves the script. Per-request data
    lives in locals; ``bots`` and ``guard.limits`` are read per beacon (settable)."""

    def __init__(
        self,
        *,
        keyring: Keyring,
        recorder: EventRecorder,
        guard: EventGuard,
        stats: TrackingStats,
        paths: EndpointPaths,
        script: bytes,
        max_body: int,
        max_events: int,
        allowed_origins: Sequence[str],
        body_timeout: float,
        clock: Callable[[], float],
        bots: Literal["ignore", "track"] = "ignore",
    ) -> None:
        self._keyring = keyring
        self._recorder = recorder
        self._guard = guard
        self._stats = stats
        self._body_timeout = body_timeout
        self._clock = clock
        self.bots = bots
        self._paths = paths
        self._max_body = max_body
        self._max_events = max_events
        self._allowed_origins = frozenset(o.rstrip("/") for o in allowed_origins)
        # Experience parts of verified tokens, decoded (see decode_tokens; bounded there).
        self._decoded_experiences: dict[str, tuple[str, Mapping[str, Any]]] = {}
        self._script = script
        self._etag = '"' + paths.script.rsplit(".", 2)[-2] + '"'
        self._log = RateLimitedLog(logger)

    # -- routing -----------------------------------------------------------------------------

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        identity: Identity | None,
        client_ip: str | None = None,
    ) -> None:
        started = False
        body_done = not _may_have_body(scope)

        async def tracked_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done:
                    # Answered before the body was read (refused, slow, a crawler's): the
                    # server must not keep the connection waiting for the rest of it.
                    message = {**message, "headers": _closing(message.get("headers", ()))}
            await send(message)

        try:
            await self._route(scope, tracked_receive, tracked_send, identity, client_ip)
        except _Disconnected:
            return
        except Exception as exc:  # the one boundary: never a 500 from here
            self._log.exception(
                "endpoint-error", "personalize: tracking endpoint failed", exc_info=exc
            )
            if not started:
                await _text(400, "bad request")(scope, tracked_receive, tracked_send)

    async def _route(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        identity: Identity | None,
        client_ip: str | None,
    ) -> None:
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path + "/"):
            path = path[len(root_path) :]
        method: str = scope["method"]
        paths = self._paths
        response: Response
        if path == paths.events:
            if method != "POST":
                response = _text(405, "method not allowed", {"allow": "POST"})
            else:
                response = await self._beacon(scope, receive, identity, client_ip)
        elif path in (paths.script, paths.script_alias):
            if method not in ("GET", "HEAD"):
                response = _text(405, "method not allowed", {"allow": "GET, HEAD"})
            else:
                response = self._script_response(scope, immutable=path == paths.script)
        else:
            response = _text(404, "not found")
        await response(scope, receive, send)

    def _script_response(self, scope: Scope, *, immutable: bool) -> Response:
        headers = {
            "cache-control": _SCRIPT_IMMUTABLE if immutable else _SCRIPT_SHORT,
            "etag": self._etag,
            "x-content-type-options": "nosniff",
        }
        if _header(scope, b"if-none-match") == self._etag.encode():
            return Response(status_code=304, headers=headers)
        headers["content-length"] = str(len(self._script))
        body = b"" if scope["method"] == "HEAD" else self._script
        return Response(body, headers=headers, media_type="text/javascript; charset=utf-8")

    # -- beacons -----------------------------------------------------------------------------

    async def _beacon(
        self, scope: Scope, receive: Receive, identity: Identity | None, client_ip: str | None
    ) -> Response:
        stats = self._stats
        stats.beacons += 1
        if not self._same_origin(scope):
            stats.rejected_cross_site += 1
            return _text(403, "forbidden")
        if self.bots == "ignore" and is_bot(_header(scope, b"user-agent")):
            stats.rejected_bot += 1  # not even read: nothing a crawler sends is counted
            return Response(status_code=204, headers=_NO_STORE)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._max_body):
            stats.rejected_too_large += 1
            return _text(413, "payload too large")
        try:
            async with asyncio.timeout(self._body_timeout):
                body = await _read_body(receive, self._max_body)
        except TimeoutError:
            stats.rejected_slow += 1  # answered with Connection: close (see __call__)
            return _text(408, "request timeout")
        if body is None:
            stats.rejected_too_large += 1
            return _text(413, "payload too large")
        parsed = _parse_beacon(body)
        if parsed is None:
            stats.rejected_malformed += 1
            return _text(400, "bad request")
        texts, page = parsed
        if len(texts) > self._max_events:
            stats.rejected_too_large += 1
            return _text(413, "too many events")
        now = self._clock()
        tokens = self._verify(texts, page, identity, now)
        if tokens is None or identity is None:
            stats.rejected_forbidden += 1
            return _text(403, "forbidden")
        if client_ip is None:
            client = scope.get("client")
            client_ip = str(client[0]) if client else None
        if not await self._record(identity, tokens, address_key(client_ip), now):
            # Not stored (the outbox's Redis or disk failed): 204 would promise delivery.
            return _text(503, "service unavailable", {"retry-after": "1"})
        return Response(status_code=204, headers=_NO_STORE)

    async def _record(
        self, identity: Identity, tokens: list[TrackingToken], address: str | None, now: float
    ) -> bool:
        """Each verified event through the human checks to the recorder; ``False`` when
        the recorder could not store what passed (the outbox failed)."""
        stats, recorder, guard = self._stats, self._recorder, self._guard
        if identity.api_customer_id is None:
            stats.unattributable += len(tokens)
            return True
        visitor = _visitor_key(identity)
        admitted: list[TrackingToken] = []
        uuids: list[str] = []
        for token in tokens:
            event_uuid = recorder.event_uuid(token)
            if recorder.seen(event_uuid):
                stats.replays += 1
            elif guard.too_soon(token, now):
                stats.rejected_too_soon += 1
                recorder.burn(event_uuid)
            elif not guard.admit(visitor, address, token, now):
                stats.rejected_rate += 1
            else:
                admitted.append(token)
                uuids.append(event_uuid)
        return await recorder.record_all(identity, admitted, now, event_uuids=uuids)

    def _verify(
        self, texts: list[str], page: str | None, identity: Identity | None, now: float
    ) -> list[TrackingToken] | None:
        if identity is None:
            return None
        try:
            return decode_events(
                self._keyring,
                identity,
                texts,
                page=page,
                now=now,
                decoded=self._decoded_experiences,
            )
        except InvalidTokenError as exc:
            self._log.debug("bad-token", "personalize: beacon refused: %s", exc)
            return None

    def _same_origin(self, scope: Scope) -> bool:
        origin = _header(scope, b"origin")
        origin_text = None if origin is None else origin.decode("latin-1").rstrip("/")
        allowed = origin_text is not None and origin_text in self._allowed_origins
        fetch_site = _header(scope, b"sec-fetch-site")
        if fetch_site is not None and fetch_site not in _ALLOWED_FETCH_SITES and not allowed:
            self._log.debug("cross-site", "personalize: cross-site beacon refused")
            return False
        if origin_text is None or allowed:
            return True
        host = _header(scope, b"host")
        if host is not None and _origin_matches_host(origin_text, host.decode("latin-1")):
            return True
        self._log.warning(
            "origin-mismatch",
            "personalize: beacon refused: Origin %r does not match the Host header; if a "
            "proxy rewrites Host, list the site's origin in allowed_origins",
            origin_text[:100],
        )
        return False


# -- helpers -------------------------------------------------------------------------------


def _visitor_key(identity: Identity) -> str:
    key = identity.cache_key
    if len(key) > _MAX_VISITOR_KEY:  # bounded memory per visitor, whatever the id
        key = "h:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return key


def _may_have_body(scope: Scope) -> bool:
    """An HTTP/1 request with a body to come (HTTP/2 ends a stream, not a connection:
    ``Connection`` is not even a legal header there)."""
    if scope.get("http_version", "1.1") not in ("1.0", "1.1"):
        return False
    length = _header(scope, b"content-length")
    return (length is not None and length != b"0") or _header(
        scope, b"transfer-encoding"
    ) is not None


def _closing(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"connection"]
    return [*kept, (b"connection", b"close")]


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or ``None`` once it exceeds ``limit`` (whatever Content-Length
    claimed: chunked bodies have none, and a lying one must not make us buffer more)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        if message["type"] != "http.request":
            continue
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _parse_beacon(body: bytes) -> tuple[list[str], str | None] | None:
    """(events, page manifest or ``None``), or ``None`` when malformed."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    events = data.get("events")
    if not isinstance(events, list) or not events:
        return None
    if not all(isinstance(item, str) for item in events):
        return None
    page = data.get("page")
    if page is not None and not isinstance(page, str):
        return None
    return events, page


def _origin_matches_host(origin: str, host: str) -> bool:
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        host_parts = urlsplit("//" + host)
        host_port = host_parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path:
        return False
    # Schemes are not compared: behind a TLS-terminating proxy the app sees http.
    return parts.hostname == host_parts.hostname and origin_port == host_port


_NO_STORE = {"cache-control": "no-store"}


def _text(status: int, text: str, headers: Mapping[str, str] | None = None) -> Response:
    return PlainTextResponse(text, status_code=status, headers={**_NO_STORE, **(headers or {})})
