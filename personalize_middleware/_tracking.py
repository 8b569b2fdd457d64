"""Impression and click tracking: signed tokens, template hooks, the script, the endpoint.

A page carries, on the element that shows an experience and on each clickable element
inside it, a *tracking token*: who the page was rendered for, which experience, its
``experience_context``, the page view (render id), the click's ``b_id`` and an expiry,
signed with the ``"track"`` key of the server's ``Keyring``. Token format::

    <payload>.<signature>
    payload   = base64url(raw deflate(JSON [1, kind, key, render_id, expires, context, b_id?]))
    signature = base64url(HMAC-SHA256(track key, sha256(identity.cache_key) || payload)[:16])

The identity is bound through the MAC, not written into the token: the page shows no
customer id or email, and a token replayed by another visitor fails verification.
``kind`` is ``"s"`` (shown) or ``"c"`` (clicked), so a click token cannot be replayed as
an impression and the ``b_id`` of a click cannot be changed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import json
import logging
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from markupsafe import Markup, escape

from ._backend import PersonalizeBackend
from ._batcher import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_QUEUE,
    DEFAULT_SHUTDOWN_TIMEOUT,
    BatcherStats,
    EventBatcher,
)
from ._exceptions import ConfigurationError, TemplateUsageError
from ._logging import RateLimitedLog
from ._models import Experience, Identity
from ._signing import Keyring, b64url_decode, b64url_encode

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from ._handle import Personalization

__all__ = [
    "CLICK_ATTR",
    "DEFAULT_TOKEN_TTL",
    "IMPRESSION_ATTR",
    "MAX_B_ID_LENGTH",
    "InvalidTokenError",
    "Tracking",
    "TrackingStats",
    "TrackingToken",
    "decode_token",
    "encode_token",
    "validate_b_id",
]

logger = logging.getLogger("personalize_middleware.tracking")

DEFAULT_TOKEN_TTL = 3600.0
DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_MAX_EVENTS_PER_BEACON = 50
MAX_B_ID_LENGTH = 128
#: The HTML attributes the hooks write and the script reads.
IMPRESSION_ATTR = "data-pz-impression"
CLICK_ATTR = "data-pz-click"
ENDPOINT_ATTR = "data-pz-endpoint"
_ATTR_NAMES = {n: Markup(n) for n in (IMPRESSION_ATTR, CLICK_ATTR, ENDPOINT_ATTR)}  # noqa: S704

TOKEN_PURPOSE = "track"  # noqa: S105 - a key-derivation label, not a secret
_TOKEN_VERSION = 1
_KINDS = {"s": "shown", "c": "clicked"}
_KIND_CODES = {v: k for k, v in _KINDS.items()}
_MAX_TOKEN_CHARS = 8192
_MAX_PAYLOAD_BYTES = 16384  # inflated size cap: a signed token is ours, but stay bounded
_IDENTITY_LABEL = b"personalize-middleware/track-identity\x00"


class InvalidTokenError(ValueError):
    """A tracking token that is malformed, forged, expired or someone else's."""


@dataclass(frozen=True, slots=True)
class TrackingToken:
    """What a tracking token says. ``kind`` is ``"shown"`` or ``"clicked"``."""

    kind: Literal["shown", "clicked"]
    key: str
    context: Mapping[str, Any]
    render_id: str
    expires: int
    b_id: str | None = None


def _identity_digest(identity: Identity) -> bytes:
    return hashlib.sha256(
        _IDENTITY_LABEL + identity.cache_key.encode("utf-8", "surrogatepass")
    ).digest()


def encode_token(keyring: Keyring, identity: Identity, token: TrackingToken) -> str:
    """Sign ``token`` for ``identity`` (see the module docstring for the format)."""
    body: list[Any] = [
        _TOKEN_VERSION,
        _KIND_CODES[token.kind],
        token.key,
        token.render_id,
        int(token.expires),
        dict(token.context),
    ]
    if token.b_id is not None:
        body.append(token.b_id)
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = b64url_encode(packer.compress(raw) + packer.flush())
    signature = keyring.sign(TOKEN_PURPOSE, _identity_digest(identity) + payload.encode("ascii"))
    return f"{payload}.{signature}"


def decode_token(
    keyring: Keyring, identity: Identity, text: object, *, now: float | None = None
) -> TrackingToken:
    """Verify and read a token for the beacon's ``identity``.

    Raises ``InvalidTokenError`` when it is not a token, was not signed by any key of
    ``keyring`` for this identity, or has expired.
    """
    if not isinstance(text, str) or not 0 < len(text) <= _MAX_TOKEN_CHARS:
        raise InvalidTokenError("not a token")
    payload, dot, signature = text.partition(".")
    if not dot or not payload or "." in signature or not payload.isascii():
        raise InvalidTokenError("not a token")
    data = _identity_digest(identity) + payload.encode("ascii")
    if keyring.verify(TOKEN_PURPOSE, data, signature) is None:
        raise InvalidTokenError("bad signature (forged, or signed for another visitor)")
    # Only signed (our own) payloads get this far; the caps are belt and braces.
    try:
        unpacker = zlib.decompressobj(-15)
        raw = unpacker.decompress(b64url_decode(payload), _MAX_PAYLOAD_BYTES)
        if unpacker.unconsumed_tail or not unpacker.eof:
            raise InvalidTokenError("payload too large")
        body = json.loads(raw)
    except (ValueError, zlib.error, RecursionError) as exc:
        raise InvalidTokenError("undecodable payload") from exc
    token = _token_from_body(body)
    if token.expires < (time.time() if now is None else now):
        raise InvalidTokenError("expired")
    return token


def _token_from_body(body: Any) -> TrackingToken:
    if not isinstance(body, list) or len(body) not in (6, 7) or body[0] != _TOKEN_VERSION:
        raise InvalidTokenError("unknown token version")
    _, kind, key, render_id, expires, context, *rest = body
    b_id = rest[0] if rest else None
    if (
        kind not in _KINDS
        or not isinstance(key, str)
        or not isinstance(render_id, str)
        or not isinstance(expires, int)
        or not isinstance(context, dict)
        or (b_id is not None and not isinstance(b_id, str))
        or (kind == "c") != (b_id is not None)
    ):
        raise InvalidTokenError("unexpected token fields")
    return TrackingToken(
        kind="shown" if kind == "s" else "clicked",
        key=key,
        context=context,
        render_id=render_id,
        expires=expires,
        b_id=b_id,
    )


def validate_b_id(b_id: object) -> str:
    """A click's ``b_id``: a non-empty printable string of at most 128 characters."""
    if not isinstance(b_id, str):
        raise TemplateUsageError(f"b_id must be a string, got {type(b_id).__name__}")
    if not b_id:
        raise TemplateUsageError("b_id must not be empty")
    if len(b_id) > MAX_B_ID_LENGTH:
        raise TemplateUsageError(f"b_id is longer than {MAX_B_ID_LENGTH} characters")
    if not b_id.isprintable():
        raise TemplateUsageError(f"b_id must be printable text, got {b_id!r}")
    return b_id


@functools.cache
def _script() -> bytes:
    return (
        importlib.resources.files("personalize_middleware")
        .joinpath("static/personalize.js")
        .read_bytes()
    )


@dataclass(slots=True)
class TrackingStats:
    """Counters of the endpoint, plus the batcher's (``queued``, ``sent``, ...)."""

    beacons: int = 0
    accepted: int = 0
    replays: int = 0
    server_impressions: int = 0
    rejected_malformed: int = 0
    rejected_forbidden: int = 0
    rejected_cross_site: int = 0
    rejected_too_large: int = 0
    unattributable: int = 0
    batcher: BatcherStats = field(default_factory=BatcherStats)

    @property
    def queued(self) -> int:
        return self.batcher.queued

    @property
    def sent(self) -> int:
        return self.batcher.sent

    @property
    def retried(self) -> int:
        return self.batcher.retried

    @property
    def dropped(self) -> int:
        return self.batcher.dropped


class Tracking:
    """Tracking hooks, the tracking script, the beacon endpoint and the event batcher.

    ``PersonalizeMiddleware`` builds one (``tracking=True``) or takes yours
    (``tracking=Tracking(...)``); it routes ``{prefix}/...`` here and starts / closes it
    with the app's lifespan. ``impressions="server"`` counts an impression when the page
    is rendered (pages without JavaScript) instead of when the element is seen.
    ``allowed_origins`` lists origins (``"https://www.example.com"``) whose beacons are
    accepted besides the request's own Host (needed when a proxy rewrites Host).
    ``flush_interval``, ``max_queue`` and ``shutdown_timeout`` tune the default batcher;
    pass ``batcher`` for full control.
    """

    def __init__(
        self,
        *,
        keyring: Keyring,
        backend: PersonalizeBackend,
        prefix: str = "/_personalize",
        token_ttl: float = DEFAULT_TOKEN_TTL,
        max_body: int = DEFAULT_MAX_BODY,
        max_events_per_beacon: int = DEFAULT_MAX_EVENTS_PER_BEACON,
        impressions: Literal["client", "server"] = "client",
        allowed_origins: Sequence[str] = (),
        batcher: EventBatcher | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        replay_cache_size: int = 100_000,
    ) -> None:
        from ._events import BeaconEndpoint  # the endpoint imports this module's tokens

        if not prefix.startswith("/") or prefix.endswith("/") or '"' in prefix:
            raise ConfigurationError(
                "prefix must start with '/' and not end with '/'", field="prefix"
            )
        if impressions not in ("client", "server"):
            raise ConfigurationError(
                "impressions must be 'client' or 'server'", field="impressions"
            )
        for name, value in (
            ("token_ttl", token_ttl),
            ("max_body", max_body),
            ("max_events_per_beacon", max_events_per_beacon),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"{name} must be positive", field=name)
        self.keyring = keyring
        self.prefix = prefix
        self.token_ttl = float(token_ttl)
        self.impressions = impressions
        self.batcher = batcher or EventBatcher(
            backend,
            flush_interval=flush_interval,
            max_queue=max_queue,
            shutdown_timeout=shutdown_timeout,
        )
        self.stats = TrackingStats(batcher=self.batcher.stats)
        self._log = RateLimitedLog(logger)
        script = _script()
        digest = hashlib.sha256(script).digest()
        #: ``sha256-<base64>`` of the script, for a CSP ``script-src`` (and SRI).
        self.script_hash = "sha256-" + base64.b64encode(digest).decode("ascii")
        self.script_path = f"{prefix}/personalize.{digest.hex()[:12]}.js"
        self.events_path = f"{prefix}/events"
        self._endpoint = BeaconEndpoint(
            self,
            max_body=int(max_body),
            max_events=int(max_events_per_beacon),
            allowed_origins=allowed_origins,
            replay_cache_size=replay_cache_size,
            script=script,
        )

    def __repr__(self) -> str:
        return f"Tracking(prefix={self.prefix!r}, impressions={self.impressions!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the event batcher (the middleware calls this on lifespan start-up)."""
        await self.batcher.start()

    async def aclose(self, timeout: float | None = None) -> None:
        """Flush queued events within ``timeout`` (the batcher's default if ``None``)."""
        await self.batcher.aclose(timeout)

    # -- ASGI --------------------------------------------------------------------------------

    def matches(self, path: str) -> bool:
        """True for paths this object answers (everything under ``prefix``)."""
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, identity: Identity | None
    ) -> None:
        """Answer a request under ``prefix``: ``POST {prefix}/events`` (beacons, for the
        visitor ``identity`` resolved from this request) and ``GET`` the script. Never
        raises and never answers 500."""
        await self._endpoint(scope, receive, send, identity)

    # -- template hooks ------------------------------------------------------------------------

    def token_for(
        self, handle: Personalization, experience: Experience, b_id: str | None = None
    ) -> str | None:
        """A signed token for ``experience`` on this page view, or ``None`` when the
        visitor cannot be attributed (no resolved identity or no customer id)."""
        identity = handle.identity
        if identity is None or identity.api_customer_id is None:
            self._log.debug("unattributable", "personalize: no customer id; hook left empty")
            return None
        return encode_token(
            self.keyring,
            identity,
            TrackingToken(
                kind="shown" if b_id is None else "clicked",
                key=experience.key,
                context=experience.experience_context,
                render_id=handle.render_id,
                expires=int(time.time() + self.token_ttl),
                b_id=b_id,
            ),
        )

    def impression_attrs(self, handle: Personalization, experience: Experience) -> Markup:
        """The attribute for the element showing ``experience``. With
        ``impressions="server"`` the impression is recorded now and nothing is emitted."""
        if self.impressions == "server":
            identity = handle.identity
            if identity is not None:
                self._endpoint.record_server_impression(identity, handle.render_id, experience)
            return Markup("")
        token = self.token_for(handle, experience)
        return Markup("") if token is None else _attr(IMPRESSION_ATTR, token)

    def click_attrs(self, handle: Personalization, experience: Experience, b_id: object) -> Markup:
        """The attribute for a clickable element inside ``experience``; ``b_id`` names it
        (``"Add to Cart"``). Raises ``TemplateUsageError`` for an invalid ``b_id``."""
        token = self.token_for(handle, experience, validate_b_id(b_id))
        return Markup("") if token is None else _attr(CLICK_ATTR, token)

    def script_tag(self, nonce: str | None = None, *, root_path: str = "") -> Markup:
        """``<script>`` for the tracking script: deferred, with an ``integrity`` hash (so a
        CSP listing ``script_hash`` allows it) and an optional CSP ``nonce``."""
        parts = [
            Markup(' src="{}"').format(root_path + self.script_path),
            Markup(' integrity="{}"').format(self.script_hash),
            _attr(ENDPOINT_ATTR, root_path + self.events_path),
        ]
        if nonce:
            parts.append(Markup(' nonce="{}"').format(nonce))
        return Markup("<script defer{}></script>").format(Markup("").join(parts))


def _attr(name: str, value: str) -> Markup:
    # Names are module constants (valid by construction); values are always escaped.
    return Markup(' {}="{}"').format(_ATTR_NAMES[name], escape(value))
