"""Tracking tokens: what a hook writes into the page and the endpoint verifies.

A page carries, on the element that shows an experience and on each clickable element
inside it, a *tracking token*: who the page was rendered for, which experience, its
``experience_context``, the page view (render id), the click's ``b_id`` and an expiry,
signed with the ``"track"`` key of the server's ``Keyring``. Token format (five fields,
none of which can contain a dot)::

    <experience>.<render_id>.<expires>.<element>.<signature>
    experience = base64url(raw deflate(JSON [key, experience_context]))
    render_id  = the page view's id ([A-Za-z0-9_-], at most 64 characters)
    expires    = Unix time in milliseconds, decimal (render time + token_ttl)
    element    = "s" (shown) | "c" base64url(UTF-8 b_id) (clicked)
    signature  = base64url(BLAKE2b-128(key = the track key for BLAKE2b,
                                       "pz-track-4" NUL || sha256(identity)
                                       || everything before the last dot))

The expiry is in milliseconds so that the render time it implies is precise enough for
the endpoint's human-timing rules (``_guard``). Keyed BLAKE2b (a MAC by design, its own
derived key) signs in half the time of HMAC-SHA256, and a page signs every element.
Tokens of the previous formats still verify, so pages rendered before an upgrade keep
reporting until they expire: ``pz-track-3`` (the same fields, signed with
HMAC-SHA256(track key, label || digest || body) truncated to 16 bytes) and
``pz-track-2`` (HMAC too, expiry in whole seconds); ``TrackingToken.expires`` is
seconds either way.

The identity is bound through the MAC, not written into the token: the page shows no
customer id or email, and a token replayed by another visitor fails verification. Every
field is under the one signature, so a click cannot be renamed or passed off as an
impression, and an experience's context cannot be swapped for another's.

The parts are built where they change: the experience part once per ``Experience``
object (kept in its derived-data cache), the identity digest, render id and expiry once
per page view (``Tracking`` keeps them on the handle), and per element only the element
part and the HMAC.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from .._exceptions import InvalidTokenError, TemplateUsageError
from .._models import Experience, Identity
from .._signing import FastSigner, Keyring, b64url_decode, b64url_encode

__all__ = [
    "MAX_B_ID_LENGTH",
    "TOKEN_PURPOSE",
    "TrackingToken",
    "decode_token",
    "decode_tokens",
    "encode_token",
    "experience_token_part",
    "token_signer",
    "validate_b_id",
]

MAX_B_ID_LENGTH = 128
TOKEN_PURPOSE = "track"  # noqa: S105 - a key-derivation label, not a secret
#: Starts every MAC input: a token of another format version never verifies as this one.
_MAC_LABEL = b"pz-track-4\x00"
#: The previous formats (HMAC-SHA256; the oldest with expiry in seconds), still read
#: until their tokens have expired.
_HMAC_MAC_LABEL = b"pz-track-3\x00"
_LEGACY_MAC_LABEL = b"pz-track-2\x00"
_IMPRESSION_PART = "s"
_MAX_TOKEN_CHARS = 8192
_MAX_CONTEXT_BYTES = 16384  # inflated size cap: a signed token is ours, but stay bounded
_IDENTITY_LABEL = b"personalize-middleware/track-identity\x00"
_RENDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DERIVED_KEY = "track"  # this module's entry in Experience.derived
_DECODED_LIMIT = 1024  # experience parts the endpoint keeps decoded


@dataclass(frozen=True, slots=True)
class TrackingToken:
    """What a tracking token says. ``kind`` is ``"shown"`` or ``"clicked"``."""

    kind: Literal["shown", "clicked"]
    key: str
    context: Mapping[str, Any]
    render_id: str
    #: Unix time (seconds, millisecond precision) after which the token is refused.
    expires: float
    b_id: str | None = None


def _identity_digest(identity: Identity) -> bytes:
    return hashlib.sha256(
        _IDENTITY_LABEL + identity.cache_key.encode("utf-8", "surrogatepass")
    ).digest()


def token_signer(keyring: Keyring, identity: Identity) -> FastSigner:
    """Signs token bodies for ``identity`` (the MAC prefix hashed in): ``.sign(body)``."""
    return keyring.fast_signer(TOKEN_PURPOSE, _MAC_LABEL + _identity_digest(identity))


def _experience_part(key: str, context: Mapping[str, Any]) -> str:
    # ASCII JSON (lone surrogates from the API survive), deflated: a typical context goes
    # from ~350 to ~215 characters for ~9 µs, paid once per Experience object.
    raw = json.dumps([key, dict(context)], separators=(",", ":"), default=str).encode("ascii")
    return b64url_encode(zlib.compress(raw, 9, -15))


def _cached_experience_part(experience: Experience) -> str:
    """The experience part, encoded once per ``Experience`` object (its fields are
    immutable; the part holds no identity, so a shared experience can share it)."""
    part = experience.derived.get(_DERIVED_KEY)
    if part is None:
        part = experience.derived[_DERIVED_KEY] = _experience_part(
            experience.key, experience.experience_context
        )
    return part


def experience_token_part(experience: Experience) -> str:
    """The first field of every token of ``experience`` (encoded once per object): the
    debug overlay matches the tokens a page sends to its experiences with it."""
    return experience.derived.get(_DERIVED_KEY) or _cached_experience_part(experience)


def _click_part(b_id: str) -> str:
    return "c" + b64url_encode(b_id.encode("utf-8", "surrogatepass"))


def _page_tail(render_id: str, expires: float) -> str:
    """``.render_id.expires.`` with ``expires`` (Unix seconds) written in milliseconds."""
    if _RENDER_ID.fullmatch(render_id) is None:
        raise TemplateUsageError("render_id must be 1 to 64 characters of [A-Za-z0-9_-]")
    return f".{render_id}.{round(expires * 1000)}."


def encode_token(keyring: Keyring, identity: Identity, token: TrackingToken) -> str:
    """Sign ``token`` for ``identity`` (see the module docstring for the format).

    The one-off form; templates go through ``Tracking``, which reuses the parts that
    are the same for every element of a page."""
    element = _IMPRESSION_PART if token.kind == "shown" else None
    if (token.b_id is None) != (element is not None):
        raise TemplateUsageError("a click token needs a b_id, an impression token none")
    body = (
        _experience_part(token.key, token.context)
        + _page_tail(token.render_id, token.expires)
        + (element or _click_part(token.b_id or ""))
    )
    return body + "." + token_signer(keyring, identity).sign(body.encode("ascii"))


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
    digest = _identity_digest(identity)
    mac_prefix = _MAC_LABEL + digest
    moment = time.time() if now is None else now
    experiences = {} if decoded is None else decoded
    tokens = []
    for text in texts:
        if not isinstance(text, str) or not 0 < len(text) <= _MAX_TOKEN_CHARS:
            raise InvalidTokenError("not a token")
        body, _, signature = text.rpartition(".")
        if not body or not text.isascii() or not _canonical_signature(signature):
            raise InvalidTokenError("not a token")
        scale = 1000.0
        raw = body.encode("ascii")
        # A previous format? (More MACs only for tokens that failed the first.)
        if (
            keyring.fast_verify(TOKEN_PURPOSE, mac_prefix + raw, signature) is None
            and keyring.verify(TOKEN_PURPOSE, _HMAC_MAC_LABEL + digest + raw, signature) is None
        ):
            legacy = _LEGACY_MAC_LABEL + digest + raw
            if keyring.verify(TOKEN_PURPOSE, legacy, signature) is None:
                raise InvalidTokenError("bad signature (forged, or signed for another visitor)")
            scale = 1.0
        # Only signed (our own) tokens get this far; the checks are belt and braces.
        fields = body.split(".")
        if len(fields) != 4:
            raise InvalidTokenError("unexpected token fields")
        part, render_id, expires, element = fields
        token = read_fields(part, render_id, expires, element, scale, experiences)
        if token.expires < moment:
            raise InvalidTokenError("expired")
        tokens.append(token)
    return tokens


def read_fields(
    part: str,
    render_id: str,
    expires: str,
    element: str,
    scale: float,
    decoded: dict[str, tuple[str, Mapping[str, Any]]],
) -> TrackingToken:
    """The token that signed fields say (``scale``: expiry units per second). The
    experience part is decoded once and kept in ``decoded`` (bounded)."""
    found = decoded.get(part)
    if found is None:
        found = _decode_experience(part)
        if len(decoded) >= _DECODED_LIMIT:
            decoded.clear()
        decoded[part] = found
    if not render_id or not expires.isdigit() or len(expires) > 15:
        raise InvalidTokenError("unexpected token fields")
    return TrackingToken(
        kind="shown" if element == _IMPRESSION_PART else "clicked",
        key=found[0],
        context=found[1],
        render_id=render_id,
        expires=int(expires) / scale,
        b_id=None if element == _IMPRESSION_PART else _decode_b_id(element),
    )


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
