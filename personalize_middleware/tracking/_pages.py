"""The page-view manifest: one signature for every hook a page renders.

In a page rendered through ``PersonalizeTemplates`` (which makes sure the manifest is
written), a hook writes only the page view's render id and an index,
``data-pz-click="<render_id>~3"``; ``personalize_script()`` then writes the page's
*manifest* on its tag (``data-pz-page``), the hooks' experiences and elements signed
once, or, where the template has no ``personalize_script()`` after its hooks (a
fragment for htmx, say), ``PersonalizeTemplates`` appends it to the HTML as
``<template data-pz-page="...">``::

    <parts>.<render_id>.<expires>.<elements>.<signature>
    parts     = every experience part of the page's hooks, each once, joined by "~"
                (a part as in a token: base64url(raw deflate(JSON [key, context])))
    elements  = per hook, in index order, <part index><element>, joined by "~"
                (an element as in a token: "s", or "c" base64url(UTF-8 b_id))
    signature = base64url(BLAKE2b-128(track key for BLAKE2b,
                                      "pz-page-1" NUL || sha256(identity)
                                      || everything before the last dot))

A beacon then says ``{"events": ["<render_id>~3", ...], "page": "<manifest>"}`` (one
beacon per page view: a document may hold a page and fragments). The endpoint
verifies the manifest (bound to the visitor like a token, under its own label so that a
manifest never reads as a token or the reverse) and reads event ``~3`` as the token the
hook would have carried: the same experience, render id, expiry and ``b_id``, so the
replay, timing and rate rules apply unchanged. A beacon can name only what the page's
manifest lists: no other ``b_id``, no other experience, no other visitor.

Why: a token per hook is a signature and ~250 characters per hook; a page of 30 hooks
signed 30 times. With the manifest a hook costs a list append and a cached attribute,
the page one signature, and each experience's part is in the page once.

Hooks rendered after ``personalize_script()`` (a script tag in ``<head>``), and every
hook of a template rendered any other way (a bare ``jinja2.Environment``), carry full
tokens: nothing would write a manifest listing them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._exceptions import InvalidTokenError
from .._models import Identity
from .._signing import FastSigner, Keyring
from ._tokens import (
    TOKEN_PURPOSE,
    TrackingToken,
    _canonical_signature,
    _identity_digest,
    decode_tokens,
    read_fields,
)

__all__ = [
    "INDEX_MARK",
    "MAX_PAGE_CHARS",
    "PAGE_ATTR",
    "PageManifest",
    "PageState",
    "decode_events",
    "decode_page",
    "page_signer",
]

#: The script tag's attribute holding the manifest.
PAGE_ATTR = "data-pz-page"
#: Between a hook's render id and its index into the manifest.
INDEX_MARK = "~"
#: Longer manifests are refused (a page of 25 experiences x 30 hooks writes ~6 KB).
MAX_PAGE_CHARS = 60_000
_PAGE_LABEL = b"pz-page-1\x00"
_ELEMENT = re.compile(r"([0-9]{1,4})(s|c[A-Za-z0-9_-]+)")
_INDEX = re.compile(r"([A-Za-z0-9_-]{1,64})~([0-9]{1,4})")


def page_signer(keyring: Keyring, identity: Identity) -> FastSigner:
    """Signs manifests for ``identity`` (the MAC prefix hashed in)."""
    return keyring.fast_signer(TOKEN_PURPOSE, _PAGE_LABEL + _identity_digest(identity))


class PageState:
    """A page view's ``tracking_state``: what every hook of it shares. The identity it
    was made for, its token and manifest signers, ``.render_id.expires.``, per
    experience part the token signer with ``part + tail`` hashed in, the manifest."""

    __slots__ = (
        "identity",
        "index_prefix",
        "manifest",
        "page_signer",
        "signer",
        "signers",
        "tail",
    )

    def __init__(
        self,
        identity: Identity,
        signer: FastSigner,
        page_signer: FastSigner,
        tail: str,
        closed: bool = True,
    ) -> None:
        self.identity = identity
        #: What an index hook's value starts with: the render id and "~".
        self.index_prefix = tail.split(".")[1] + INDEX_MARK
        self.signer = signer
        self.page_signer = page_signer
        self.tail = tail
        self.signers: dict[str, FastSigner] = {}
        self.manifest = PageManifest(closed=closed)


class PageManifest:
    """The hooks of one page view so far; ``closed`` once ``personalize_script()`` wrote
    it (later hooks then carry full tokens)."""

    __slots__ = ("closed", "elements", "parts")

    def __init__(self, *, closed: bool = True) -> None:
        self.parts: dict[str, int] = {}
        self.elements: list[str] = []
        self.closed = closed

    def add(self, part: str, element: str) -> int:
        """The index of a new hook showing ``part``'s experience as ``element``."""
        index = self.parts.get(part)
        if index is None:
            index = self.parts[part] = len(self.parts)
        self.elements.append(f"{index}{element}")
        return len(self.elements) - 1

    def encode(self, signer: FastSigner, tail: str) -> str:
        """The signed manifest; ``tail`` is the page's ``.render_id.expires.``."""
        body = INDEX_MARK.join(self.parts) + tail + INDEX_MARK.join(self.elements)
        return body + "." + signer.sign(body.encode("ascii"))


def decode_page(
    keyring: Keyring,
    identity: Identity,
    text: object,
    *,
    now: float,
    decoded: dict[str, tuple[str, Mapping[str, Any]]],
) -> list[TrackingToken]:
    """Verify a manifest for the beacon's ``identity``: per hook index, the token it
    stands for. Raises ``InvalidTokenError`` when it is not a manifest, was not signed
    for this visitor, or has expired."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_PAGE_CHARS or not text.isascii():
        raise InvalidTokenError("not a page manifest")
    body, _, signature = text.rpartition(".")
    if not body or not _canonical_signature(signature):
        raise InvalidTokenError("not a page manifest")
    signed = _PAGE_LABEL + _identity_digest(identity) + body.encode("ascii")
    if keyring.fast_verify(TOKEN_PURPOSE, signed, signature) is None:
        raise InvalidTokenError("bad manifest signature (forged, or another visitor's)")
    fields = body.split(".")
    if len(fields) != 4:
        raise InvalidTokenError("unexpected manifest fields")
    parts_field, render_id, expires, elements_field = fields
    parts = parts_field.split(INDEX_MARK)
    tokens = []
    for entry in elements_field.split(INDEX_MARK):
        match = _ELEMENT.fullmatch(entry)
        if match is None or int(match.group(1)) >= len(parts):
            raise InvalidTokenError("unexpected manifest element")
        part = parts[int(match.group(1))]
        tokens.append(read_fields(part, render_id, expires, match.group(2), 1000.0, decoded))
    if tokens and tokens[0].expires < now:
        raise InvalidTokenError("expired")
    return tokens


def decode_events(
    keyring: Keyring,
    identity: Identity,
    texts: Sequence[object],
    *,
    page: object,
    now: float,
    decoded: dict[str, tuple[str, Mapping[str, Any]]],
) -> list[TrackingToken]:
    """A beacon's events, in order: tokens (``decode_tokens``) and hook indexes into
    its ``page`` manifest (verified once). Raises ``InvalidTokenError`` at the first bad
    one, for an index without a manifest, past its end or of another page view."""
    indexes: list[int | None] = []
    tokens: list[object] = []
    render_ids = set()
    for text in texts:
        match = _INDEX.fullmatch(text) if isinstance(text, str) else None
        indexes.append(int(match.group(2)) if match is not None else None)
        if match is None:
            tokens.append(text)
        else:
            render_ids.add(match.group(1))
    full = iter(decode_tokens(keyring, identity, tokens, now=now, decoded=decoded))
    listed: list[TrackingToken] = []
    if len(tokens) < len(texts):
        if page is None:
            raise InvalidTokenError("a hook index without the page's manifest")
        listed = decode_page(keyring, identity, page, now=now, decoded=decoded)
        if listed and render_ids != {listed[0].render_id}:
            raise InvalidTokenError("a hook index of another page view")
    found = []
    for index in indexes:
        if index is None:
            found.append(next(full))
        elif index < len(listed):
            found.append(listed[index])
        else:
            raise InvalidTokenError("a hook index past the page's manifest")
    return found
