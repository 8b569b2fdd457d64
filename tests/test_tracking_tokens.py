"""Tracking tokens: signed, bound to the visitor, expiring, rotatable, compact, no PII."""

from __future__ import annotations

import json
import time
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalize_middleware import Identity, TemplateUsageError
from personalize_middleware._signing import Keyring, b64url_decode, b64url_encode
from personalize_middleware._tracking import (
    InvalidTokenError,
    TrackingToken,
    decode_token,
    encode_token,
    validate_b_id,
)
from tests.support.tracking_helpers import context_for

KEYRING = Keyring(["k" * 32])
ALICE = Identity(customer_id="alice@example.com")
BOB = Identity(customer_id="bob@example.com")


def token(**overrides: object) -> TrackingToken:
    fields: dict[str, object] = {
        "kind": "shown",
        "key": "hero-banner",
        "context": context_for("hero-banner"),
        "render_id": "r-0123456789abcdef",
        "expires": int(time.time()) + 600,
    }
    fields.update(overrides)
    return TrackingToken(**fields)  # type: ignore[arg-type]


def test_roundtrip_impression_and_click() -> None:
    for original in (token(), token(kind="clicked", b_id="Add to Cart")):
        assert decode_token(KEYRING, ALICE, encode_token(KEYRING, ALICE, original)) == original


def test_token_for_another_visitor_is_refused() -> None:
    text = encode_token(KEYRING, ALICE, token())
    with pytest.raises(InvalidTokenError, match="signature"):
        decode_token(KEYRING, BOB, text)
    # Same id string, different kind of identity (customer id vs anonymous visitor id).
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, Identity(visitor_id="alice@example.com"), text)


def test_expired_token_is_refused() -> None:
    text = encode_token(KEYRING, ALICE, token(expires=1000))
    with pytest.raises(InvalidTokenError, match="expired"):
        decode_token(KEYRING, ALICE, text)
    assert decode_token(KEYRING, ALICE, text, now=999).expires == 1000


def test_every_changed_character_is_refused() -> None:
    text = encode_token(KEYRING, ALICE, token(kind="clicked", b_id="Wishlist"))
    alphabet = "ABCabc012-_."
    for index in range(len(text)):
        replacement = next(c for c in alphabet if c != text[index])
        tampered = text[:index] + replacement + text[index + 1 :]
        with pytest.raises(InvalidTokenError):
            decode_token(KEYRING, ALICE, tampered)


def test_re_signed_payload_with_changed_b_id_is_refused() -> None:
    """Editing the payload (e.g. another b_id) needs the server key."""
    text = encode_token(KEYRING, ALICE, token(kind="clicked", b_id="Wishlist"))
    payload, signature = text.split(".")
    raw = zlib.decompress(b64url_decode(payload), -15)
    body = json.loads(raw)
    body[-1] = "Buy Now"
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    forged = b64url_encode(packer.compress(json.dumps(body).encode()) + packer.flush())
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, ALICE, f"{forged}.{signature}")
    other_ring = Keyring(["o" * 32])
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, ALICE, encode_token(other_ring, ALICE, token()))


def test_rotation_old_key_verifies_until_removed() -> None:
    old = Keyring(["old-secret-0123456789"])
    rotated = Keyring(["new-secret-0123456789", "old-secret-0123456789"])
    retired = Keyring(["new-secret-0123456789"])
    text = encode_token(old, ALICE, token())
    assert decode_token(rotated, ALICE, text) == token()
    with pytest.raises(InvalidTokenError):
        decode_token(retired, ALICE, text)
    # New tokens are signed with the newest key.
    assert decode_token(retired, ALICE, encode_token(rotated, ALICE, token())) == token()


def test_signature_is_purpose_separated() -> None:
    """A token's MAC is not a valid signature for another purpose (e.g. visitor cookies)."""
    text = encode_token(KEYRING, ALICE, token())
    payload, signature = text.split(".")
    assert KEYRING.verify("visitor", payload.encode(), signature) is None


def test_page_shows_no_customer_id() -> None:
    text = encode_token(KEYRING, ALICE, token())
    payload = zlib.decompress(b64url_decode(text.split(".")[0]), -15).decode()
    assert "alice" not in payload and "alice" not in text


def test_token_is_compact() -> None:
    """A typical experience_context fits in well under 400 characters."""
    text = encode_token(KEYRING, ALICE, token(kind="clicked", b_id="Add to Cart"))
    assert len(text) < 400
    assert text.isascii() and '"' not in text and "<" not in text


@pytest.mark.parametrize(
    "text",
    ["", "abc", "a.b.c", ".sig", "payload.", "é.x", "x" * 9000, None, 42, ["a.b"]],
)
def test_garbage_is_invalid(text: object) -> None:
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, ALICE, text)


def _sign_raw(raw: bytes) -> str:
    """A correctly signed token around an arbitrary payload (as if our key had leaked
    into a bug): the reader must still refuse anything that is not the token shape."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = b64url_encode(packer.compress(raw) + packer.flush())
    from personalize_middleware._tracking import TOKEN_PURPOSE, _identity_digest

    return f"{payload}.{KEYRING.sign(TOKEN_PURPOSE, _identity_digest(ALICE) + payload.encode())}"


@pytest.mark.parametrize(
    "body",
    [
        [2, "s", "k", "r", 2**40, {}],  # unknown version
        [1, "x", "k", "r", 2**40, {}],  # unknown kind
        [1, "c", "k", "r", 2**40, {}],  # click without b_id
        [1, "s", "k", "r", 2**40, {}, "b"],  # impression with b_id
        [1, "s", 1, "r", 2**40, {}],
        [1, "s", "k", "r", "soon", {}],
        [1, "s", "k", "r", 2**40, []],
        {"v": 1},
    ],
)
def test_signed_but_wrong_shape_is_invalid(body: object) -> None:
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, ALICE, _sign_raw(json.dumps(body).encode()))


def test_signed_oversized_payload_is_invalid() -> None:
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, ALICE, _sign_raw(b"[" + b" " * 100_000 + b"]"))


@given(st.text(max_size=300))
def test_random_strings_never_verify(text: str) -> None:
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, ALICE, text)


@pytest.mark.parametrize("b_id", ["Add to Cart", "Wishlist", "x", "é" * 128, "a b-c_d/é"])
def test_valid_b_ids(b_id: str) -> None:
    assert validate_b_id(b_id) == b_id


@pytest.mark.parametrize("b_id", ["", "x" * 129, "a\nb", "tab\there", "\x00", "\u200b", 3, None])
def test_invalid_b_ids(b_id: object) -> None:
    with pytest.raises(TemplateUsageError):
        validate_b_id(b_id)
