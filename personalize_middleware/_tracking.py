"""Impression and click tracking: signed tokens, template hooks, the script, the endpoint.

A page carries, on the element that shows an experience and on each clickable element
inside it, a *tracking token*: who the page was rendered for, which experience, its
``experience_context``, the page view (render id), the click's ``b_id`` and an expiry,
signed with the ``"track"`` key of the server's ``Keyring``. Token format (five fields,
none of which can contain a dot)::

    <experience>.<render_id>.<expires>.<element>.<signature>
    experience = base64url(raw deflate(JSON [key, experience_context]))
    render_id  = the page view's id ([A-Za-z0-9_-], at most 64 characters)
    expires    = Unix time, decimal
    element    = "s" (shown) | "c" base64url(UTF-8 b_id) (clicked)
    signature  = base64url(HMAC-SHA256(track key, "pz-track-2" NUL || sha256(identity)
                                       || everything before the last dot)[:16])

The identity is bound through the MAC, not written into the token: the page shows no
customer id or email, and a token replayed by another visitor fails verification. Every
field is under the one signature, so a click cannot be renamed or passed off as an
impression, and an experience's context cannot be swapped for another's.

The parts are built where they change: the experience part once per ``Experience``
object (kept in its derived-data cache), the identity digest, render id and expiry once
per page view (on the handle), and per element only the element part and the HMAC.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import json
import logging
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
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
    "decode_tokens",
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

TOKEN_PURPOSE = "track"  # noqa: S105 - a key-derivation label, not a secret
#: Starts every MAC input: a token of another format version never verifies.
_MAC_LABEL = b"pz-track-2\x00"
_IMPRESSION_PART = "s"
_MAX_TOKEN_CHARS = 8192
_MAX_CONTEXT_BYTES = 16384  # inflated size cap: a signed token is ours, but stay bounded
_IDENTITY_LABEL = b"personalize-middleware/track-identity\x00"
_RENDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DERIVED_KEY = "track"  # this module's entry in Experience._derived
_CACHE_LIMIT = 256  # b_id parts and script tags kept per Tracking (template constants)
_DECODED_LIMIT = 1024  # experience parts the endpoint keeps decoded


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


def _mac_prefix(identity: Identity) -> bytes:
    return _MAC_LABEL + _identity_digest(identity)


def _experience_part(key: str, context: Mapping[str, Any]) -> str:
    # ASCII JSON (lone surrogates from the API survive), deflated: a typical context goes
    # from ~350 to ~215 characters for ~9 µs, paid once per Experience object.
    raw = json.dumps([key, dict(context)], separators=(",", ":"), default=str).encode("ascii")
    return b64url_encode(zlib.compress(raw, 9, -15))


def _cached_experience_part(experience: Experience) -> str:
    """The experience part, encoded once per ``Experience`` object (its fields are
    immutable; the part holds no identity, so a shared experience can share it)."""
    part = experience._derived.get(_DERIVED_KEY)
    if part is None:
        part = experience._derived[_DERIVED_KEY] = _experience_part(
            experience.key, experience.experience_context
        )
    return part


def _click_part(b_id: str) -> str:
    return "c" + b64url_encode(b_id.encode("utf-8", "surrogatepass"))


def _page_tail(render_id: str, expires: int) -> str:
    if _RENDER_ID.fullmatch(render_id) is None:
        raise ValueError("render_id must be 1 to 64 characters of [A-Za-z0-9_-]")
    return f".{render_id}.{int(expires)}."


def _sign(keyring: Keyring, mac_prefix: bytes, body: str) -> str:
    # The same as the last lines of Tracking._token (inlined there: it runs per element).
    return body + "." + keyring.sign(TOKEN_PURPOSE, mac_prefix + body.encode("ascii"))


def encode_token(keyring: Keyring, identity: Identity, token: TrackingToken) -> str:
    """Sign ``token`` for ``identity`` (see the module docstring for the format).

    The one-off form; templates go through ``Tracking``, which reuses the parts that
    are the same for every element of a page."""
    element = _IMPRESSION_PART if token.kind == "shown" else None
    if (token.b_id is None) != (element is not None):
        raise ValueError("a click token needs a b_id, an impression token none")
    body = (
        _experience_part(token.key, token.context)
        + _page_tail(token.render_id, token.expires)
        + (element or _click_part(token.b_id or ""))
    )
    return _sign(keyring, _mac_prefix(identity), body)


def decode_token(
    keyring: Keyring, identity: Identity, text: object, *, now: float | None = None
) -> TrackingToken:
    """Verify and read a token for the beacon's ``identity``.

    Raises ``InvalidTokenError`` when it is not a token, was not signed by any key of
    ``keyring`` for this identity, or has expired.
    """
    return decode_tokens(keyring, identity, [text], now=now)[0]


def decode_tokens(
    keyring: Keyring,
    identity: Identity,
    texts: Sequence[object],
    *,
    now: float | None = None,
    decoded: dict[str, tuple[str, Mapping[str, Any]]] | None = None,
) -> list[TrackingToken]:
    """``decode_token`` for every token of one beacon: the identity digest is computed
    once, each distinct experience part decoded once. Raises at the first bad token.

    ``decoded`` memoizes experience parts across calls (the endpoint keeps one: the same
    experiences come back in every visitor's beacons); only parts of verified tokens
    enter it, and it is emptied when it reaches 1,024 entries."""
    mac_prefix = _mac_prefix(identity)
    moment = time.time() if now is None else now
    experiences = {} if decoded is None else decoded
    tokens = []
    for text in texts:
        if not isinstance(text, str) or not 0 < len(text) <= _MAX_TOKEN_CHARS:
            raise InvalidTokenError("not a token")
        body, _, signature = text.rpartition(".")
        if not body or not text.isascii() or not _canonical_signature(signature):
            raise InvalidTokenError("not a token")
        if keyring.verify(TOKEN_PURPOSE, mac_prefix + body.encode("ascii"), signature) is None:
            raise InvalidTokenError("bad signature (forged, or signed for another visitor)")
        # Only signed (our own) tokens get this far; the checks are belt and braces.
        fields = body.split(".")
        if len(fields) != 4:
            raise InvalidTokenError("unexpected token fields")
        part, render_id, expires, element = fields
        found = experiences.get(part)
        if found is None:
            found = _decode_experience(part)
            if len(experiences) >= _DECODED_LIMIT:
                experiences.clear()
            experiences[part] = found
        if not render_id or not expires.isdigit() or len(expires) > 15:
            raise InvalidTokenError("unexpected token fields")
        token = TrackingToken(
            kind="shown" if element == _IMPRESSION_PART else "clicked",
            key=found[0],
            context=found[1],
            render_id=render_id,
            expires=int(expires),
            b_id=None if element == _IMPRESSION_PART else _decode_b_id(element),
        )
        if token.expires < moment:
            raise InvalidTokenError("expired")
        tokens.append(token)
    return tokens


def _canonical_signature(signature: str) -> bool:
    # 16 bytes are 22 base64 characters whose last one carries 2 bits; the decoder ignores
    # the other 4, so only accept them as zero: one spelling per signature (tamper-evident
    # down to the character).
    return len(signature) == 22 and signature[-1] in "AQgw"


def _decode_experience(part: str) -> tuple[str, Mapping[str, Any]]:
    try:
        unpacker = zlib.decompressobj(-15)
        raw = unpacker.decompress(b64url_decode(part), _MAX_CONTEXT_BYTES)
        complete = unpacker.eof and not unpacker.unconsumed_tail
        body = json.loads(raw) if complete else None
    except (ValueError, zlib.error, RecursionError) as exc:
        raise InvalidTokenError("undecodable experience part") from exc
    if not complete:
        raise InvalidTokenError("experience part too large or truncated")
    if (
        not isinstance(body, list)
        or len(body) != 2
        or not isinstance(body[0], str)
        or not isinstance(body[1], dict)
    ):
        raise InvalidTokenError("unexpected experience part")
    return body[0], MappingProxyType(body[1])  # read-only: it may be shared (memoized)


def _decode_b_id(element: str) -> str:
    try:
        b_id = b64url_decode(element[1:]).decode("utf-8", "surrogatepass")
    except ValueError as exc:
        raise InvalidTokenError("undecodable element part") from exc
    # The decoder skips stray characters: accept only the one spelling we write.
    if not b_id or _click_part(b_id) != element:
        raise InvalidTokenError("unexpected element part")
    return b_id


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
        self._click_parts: dict[str, str] = {}
        self._script_tags: dict[str, tuple[str, Markup]] = {}
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

    def _new_page(self, handle: Personalization) -> tuple[Identity, bytes, str] | None:
        """The parts of this page view's tokens that are the same for every element: the
        MAC prefix (binding the identity) and ``.render_id.expires.``, kept on the handle;
        ``None`` when the visitor cannot be attributed (no resolved identity or no
        customer id)."""
        identity = handle.identity
        if identity is None or identity.api_customer_id is None:
            self._log.debug("unattributable", "personalize: no customer id; hook left empty")
            return None
        tail = _page_tail(handle.render_id, int(time.time() + self.token_ttl))
        page = handle._track_cache = (identity, _mac_prefix(identity), tail)
        return page

    def _token(self, handle: Personalization, experience: Experience, element: str) -> str | None:
        # The per-element work: look up the cached parts, concatenate, one HMAC.
        page = handle._track_cache
        if page is None or page[0] is not handle.identity:
            page = self._new_page(handle)
            if page is None:
                return None
        part = experience._derived.get(_DERIVED_KEY) or _cached_experience_part(experience)
        body = part + page[2] + element
        return body + "." + self.keyring.sign(TOKEN_PURPOSE, page[1] + body.encode("ascii"))

    def token_for(
        self, handle: Personalization, experience: Experience, b_id: str | None = None
    ) -> str | None:
        """A signed token for ``experience`` on this page view, or ``None`` when the
        visitor cannot be attributed (no resolved identity or no customer id)."""
        element = _IMPRESSION_PART if b_id is None else self._click_part(b_id)
        return self._token(handle, experience, element)

    def _click_part(self, b_id: object) -> str:
        # b_ids are template constants: validated and encoded once each (bounded).
        part = self._click_parts.get(b_id) if type(b_id) is str else None
        if part is None:
            part = _click_part(validate_b_id(b_id))
            if len(self._click_parts) < _CACHE_LIMIT:
                self._click_parts[b_id] = part  # type: ignore[index]
        return part

    def impression_attrs(self, handle: Personalization, experience: Experience) -> Markup:
        """The attribute for the element showing ``experience``. With
        ``impressions="server"`` the impression is recorded now and nothing is emitted."""
        if self.impressions == "server":
            identity = handle.identity
            if identity is not None:
                self._endpoint.record_server_impression(identity, handle.render_id, experience)
            return _EMPTY
        token = self._token(handle, experience, _IMPRESSION_PART)
        return _EMPTY if token is None else _attr(_IMPRESSION_PREFIX, token)

    def click_attrs(self, handle: Personalization, experience: Experience, b_id: object) -> Markup:
        """The attribute for a clickable element inside ``experience``; ``b_id`` names it
        (``"Add to Cart"``). Raises ``TemplateUsageError`` for an invalid ``b_id``."""
        token = self._token(handle, experience, self._click_part(b_id))
        return _EMPTY if token is None else _attr(_CLICK_PREFIX, token)

    def script_tag(self, nonce: str | None = None, *, root_path: str = "") -> Markup:
        """``<script>`` for the tracking script: deferred, with an ``integrity`` hash (so a
        CSP listing ``script_hash`` allows it) and an optional CSP ``nonce``."""
        tags = self._script_tags.get(root_path)
        if tags is None:
            start = (
                f'<script defer src="{_esc(root_path + self.script_path)}" '
                f'integrity="{_esc(self.script_hash)}" '
                f'{ENDPOINT_ATTR}="{_esc(root_path + self.events_path)}"'
            )
            tags = (start, Markup(start + "></script>"))  # noqa: S704 - built escaped
            if len(self._script_tags) < _CACHE_LIMIT:  # root_path comes from the server
                self._script_tags[root_path] = tags
        if nonce:
            return Markup(tags[0] + ' nonce="' + _esc(nonce) + '"></script>')  # noqa: S704
        return tags[1]


_EMPTY = Markup("")
_IMPRESSION_PREFIX = " " + IMPRESSION_ATTR + '="'
_CLICK_PREFIX = " " + CLICK_ATTR + '="'


def _esc(value: object) -> str:
    # A plain str: concatenating a str with Markup would escape the str side too.
    return str(escape(value))


def _attr(prefix: str, value: str) -> Markup:
    # Names are module constants (valid by construction); values are always escaped.
    # (str.join takes the escaped Markup as the str it is; "+" would escape the prefix.)
    return Markup("".join((prefix, escape(value), '"')))  # noqa: S704
