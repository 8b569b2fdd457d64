"""The beacon endpoint: ``POST {prefix}/events`` and ``GET {prefix}/personalize.<hash>.js``.

A beacon is ``{"events": ["<token>", ...]}`` (at most ``max_events`` tokens). It is
accepted (204) only when it comes from the page's own origin, fits in ``max_body`` bytes,
and *every* token verifies for the visitor sending it; otherwise nothing of it is
forwarded (400 malformed, 403 forged / expired / another visitor's / cross-site, 413 too
large). Errors of our own are logged and answered 400: this endpoint never answers 500.

Each accepted event becomes one MoEngage action. Its ``moe_event_uuid`` is a UUID v4
derived with a server key from (render id, experience key, kind, b_id): one page view's
impression (or click on one button) always carries the same uuid, so a replayed beacon is
dropped here (bounded TTL set) and, should a replay reach another worker process,
deduplicated by MoEngage on that uuid. Retries of a batch reuse the same uuids.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cachetools import TTLCache

from .._logging import RateLimitedLog
from .._models import ACTION_CLICKED, ACTION_SHOWN, EventAction, Experience, Identity
from .._signing import b64url_decode
from ._tokens import InvalidTokenError, TrackingToken, decode_tokens

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

    from ._hooks import Tracking

__all__ = ["BeaconEndpoint", "build_action"]

logger = logging.getLogger("personalize_middleware.tracking")

_EVENT_UUID_PURPOSE = "track-event"
_SCRIPT_IMMUTABLE = b"public, max-age=31536000, immutable"
_SCRIPT_SHORT = b"public, max-age=300"
_ALLOWED_FETCH_SITES = frozenset({b"same-origin", b"none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def build_action(token: TrackingToken, *, event_uuid: str, now: float) -> EventAction:
    """The MoEngage action for one verified event.

    ``attributes`` is the experience's ``experience_context`` copied field by field.
    WIRE.md: the spec's schema puts ``b_id`` beside ``attributes`` but its own click
    examples put it inside; we follow the examples. This is the one place that decides.
    """
    attributes = dict(token.context)
    if token.b_id is not None:
        attributes["b_id"] = token.b_id
    return {
        "action": ACTION_CLICKED if token.kind == "clicked" else ACTION_SHOWN,
        "moe_event_uuid": event_uuid,
        "event_time": int(now),
        "platform": "web",
        "attributes": attributes,
    }


class _Disconnected(Exception):
    pass


class BeaconEndpoint:
    """The ASGI side of ``Tracking`` (one per ``Tracking``; per-request data in locals)."""

    def __init__(
        self,
        tracking: Tracking,
        *,
        max_body: int,
        max_events: int,
        allowed_origins: Sequence[str],
        replay_cache_size: int,
        script: bytes,
    ) -> None:
        self._tracking = tracking
        self._max_body = max_body
        self._max_events = max_events
        self._allowed_origins = frozenset(o.rstrip("/") for o in allowed_origins)
        # A token cannot be replayed after it expires, so remembering an event for the
        # token lifetime (plus clock slack) is enough.
        self._seen: TTLCache[str, bool] = TTLCache(
            maxsize=replay_cache_size, ttl=tracking.token_ttl + 60
        )
        # Experience parts of verified tokens, decoded (see decode_tokens; bounded there).
        self._decoded_experiences: dict[str, tuple[str, Mapping[str, Any]]] = {}
        self._script = script
        self._etag = b'"' + tracking.script_path.rsplit(".", 2)[-2].encode() + b'"'
        self._log = RateLimitedLog(logger)

    # -- routing -----------------------------------------------------------------------------

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, identity: Identity | None
    ) -> None:
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._route(scope, receive, tracked_send, identity)
        except _Disconnected:
            return
        except Exception as exc:  # the one boundary: never a 500 from here
            self._log.exception(
                "endpoint-error", "personalize: tracking endpoint failed", exc_info=exc
            )
            if not started:
                await _respond(send, 400, b"bad request")

    async def _route(
        self, scope: Scope, receive: Receive, send: Send, identity: Identity | None
    ) -> None:
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path + "/"):
            path = path[len(root_path) :]
        method: str = scope["method"]
        tracking = self._tracking
        if path == tracking.events_path:
            if method != "POST":
                await _respond(send, 405, b"method not allowed", [(b"allow", b"POST")])
                return
            await self._beacon(scope, receive, send, identity)
        elif path in (tracking.script_path, tracking.prefix + "/personalize.js"):
            if method not in ("GET", "HEAD"):
                await _respond(send, 405, b"method not allowed", [(b"allow", b"GET, HEAD")])
                return
            await self._serve_script(scope, send, immutable=path == tracking.script_path)
        else:
            await _respond(send, 404, b"not found")

    async def _serve_script(self, scope: Scope, send: Send, *, immutable: bool) -> None:
        headers = [
            (b"content-type", b"text/javascript; charset=utf-8"),
            (b"cache-control", _SCRIPT_IMMUTABLE if immutable else _SCRIPT_SHORT),
            (b"etag", self._etag),
            (b"x-content-type-options", b"nosniff"),
        ]
        if _header(scope, b"if-none-match") == self._etag:
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b"" if scope["method"] == "HEAD" else self._script
        headers.append((b"content-length", str(len(self._script)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- beacons -----------------------------------------------------------------------------

    async def _beacon(
        self, scope: Scope, receive: Receive, send: Send, identity: Identity | None
    ) -> None:
        stats = self._tracking.stats
        stats.beacons += 1
        if not self._same_origin(scope):
            stats.rejected_cross_site += 1
            await _respond(send, 403, b"forbidden")
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._max_body):
            stats.rejected_too_large += 1
            await _respond(send, 413, b"payload too large")
            return
        body = await _read_body(receive, self._max_body)
        if body is None:
            stats.rejected_too_large += 1
            await _respond(send, 413, b"payload too large")
            return
        texts = _parse_beacon(body)
        if texts is None:
            stats.rejected_malformed += 1
            await _respond(send, 400, b"bad request")
            return
        if len(texts) > self._max_events:
            stats.rejected_too_large += 1
            await _respond(send, 413, b"too many events")
            return
        tokens = self._verify(texts, identity)
        if tokens is None or identity is None:
            stats.rejected_forbidden += 1
            await _respond(send, 403, b"forbidden")
            return
        now = time.time()
        for token in tokens:
            self._accept(identity, token, now)
        await _respond(send, 204)

    def _verify(self, texts: list[str], identity: Identity | None) -> list[TrackingToken] | None:
        if identity is None:
            return None
        try:
            return decode_tokens(
                self._tracking.keyring, identity, texts, decoded=self._decoded_experiences
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

    # -- accepting ---------------------------------------------------------------------------

    def _accept(self, identity: Identity, token: TrackingToken, now: float) -> bool:
        """Queue one verified event unless this page view already reported it."""
        stats = self._tracking.stats
        customer_id = identity.api_customer_id
        if customer_id is None:
            stats.unattributable += 1
            return False
        event_uuid = self._event_uuid(token)
        if event_uuid in self._seen:
            stats.replays += 1
            return False
        self._seen[event_uuid] = True
        stats.accepted += 1
        action = build_action(token, event_uuid=event_uuid, now=now)
        return self._tracking.batcher.enqueue(customer_id, action)

    def _event_uuid(self, token: TrackingToken) -> str:
        name = "\x00".join((token.render_id, token.key, token.kind, token.b_id or ""))
        mac = b64url_decode(self._tracking.keyring.sign(_EVENT_UUID_PURPOSE, name.encode()))
        return str(uuid.UUID(bytes=mac[:16], version=4))

    def record_server_impression(
        self, identity: Identity, render_id: str, experience: Experience
    ) -> None:
        """``impressions="server"``: count the impression at render time (once per page
        view and experience, however often the hook is rendered)."""
        token = TrackingToken(
            kind="shown",
            key=experience.key,
            context=experience.experience_context,
            render_id=render_id,
            expires=0,
        )
        if self._accept(identity, token, time.time()):
            self._tracking.stats.server_impressions += 1


# -- helpers -------------------------------------------------------------------------------


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


def _parse_beacon(body: bytes) -> list[str] | None:
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
    return events


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


async def _respond(
    send: Send, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    raw = [(b"cache-control", b"no-store"), *(headers or [])]
    if status != 204:
        raw += [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body if status != 204 else b""})
