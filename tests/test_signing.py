"""The signing primitives against their standards: HMAC-SHA256 from prepared pads (RFC
4231 test vectors, and ``hmac.digest`` on random keys and data), unpadded URL-safe
base64 (round trip, and refusal of everything that is not canonical input)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalize_middleware._signing import (
    Keyring,
    _b64url_signature,
    _hmac_pads,
    b64url_decode,
    b64url_encode,
)


def prepared_mac(key: bytes, data: bytes) -> bytes:
    inner, outer = _hmac_pads(key)
    inner, outer = inner.copy(), outer.copy()
    inner.update(data)
    outer.update(inner.digest())
    return outer.digest()


# RFC 4231, section 4: HMAC-SHA-256 test cases 1-4, 6 and 7 (case 5 truncates the output).
RFC_4231 = [
    (
        b"\x0b" * 20,
        b"Hi There",
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    ),
    (
        b"Jefe",
        b"what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
    (
        b"\xaa" * 20,
        b"\xdd" * 50,
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
    ),
    (
        bytes(range(1, 26)),
        b"\xcd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    ),
    (
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
    (
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size "
        b"data. The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    ),
]


@pytest.mark.parametrize(("key", "data", "expected"), RFC_4231)
def test_prepared_pads_give_the_rfc_4231_macs(key: bytes, data: bytes, expected: str) -> None:
    assert prepared_mac(key, data).hex() == expected


@given(st.binary(max_size=200), st.binary(max_size=500))
def test_prepared_pads_equal_the_standard_library(key: bytes, data: bytes) -> None:
    assert prepared_mac(key, data) == hmac.digest(key, data, hashlib.sha256)


@given(st.binary(max_size=300))
def test_base64_round_trip_is_unpadded_and_url_safe(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert text == base64.urlsafe_b64encode(data).decode().rstrip("=")
    if data:
        assert b64url_decode(text) == data


@pytest.mark.parametrize(
    "text",
    ["", "a", "ab!c", "ab c", "abc\n", "ab=c", "é" + "a" * 3, "a" * 16385, "abcde"],
)
def test_base64_refuses_what_is_not_canonical_input(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)


@given(
    prefix=st.binary(max_size=200),
    data=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    purpose=st.sampled_from(["track", "visitor", "preview"]),
)
def test_a_fast_signer_signs_what_fast_verify_accepts(
    prefix: bytes, data: list[bytes], purpose: str
) -> None:
    keyring = Keyring(["a-secret-of-enough-length", "an-older-secret-of-length"])
    older = Keyring(["an-older-secret-of-length"])
    signer = keyring.fast_signer(purpose, prefix)
    for item in data:  # reusable: each signature starts from the prepared prefix
        signature = signer.sign(item)
        assert signature == keyring.fast_signer(purpose).sign(prefix + item)
        assert keyring.fast_verify(purpose, prefix + item, signature) == 0
        assert keyring.fast_verify(purpose, prefix + item + b"x", signature) is None
        assert keyring.fast_verify(purpose + "-other", prefix + item, signature) is None
        assert keyring.verify(purpose, prefix + item, signature) is None  # not the HMAC's
        assert (
            keyring.fast_verify(
                purpose, prefix + item, older.fast_signer(purpose).sign(prefix + item)
            )
            == 1
        )
        longer = signer.extend(item)  # a longer prefix; the original is unchanged
        assert longer.sign(b"tail") == keyring.fast_signer(purpose).sign(prefix + item + b"tail")
        assert signer.sign(b"tail") == keyring.fast_signer(purpose).sign(prefix + b"tail")


def test_a_fast_signature_is_keyed_blake2b_with_its_own_derived_key() -> None:
    keyring = Keyring(["a-secret-of-enough-length"])
    key = hmac.new(
        b"a-secret-of-enough-length", b"personalize-middleware/v1/track/blake2b", hashlib.sha256
    ).digest()
    expected = hashlib.blake2b(b"message", key=key, digest_size=16).digest()
    assert keyring.fast_signer("track").sign(b"message") == b64url_encode(expected)
    assert keyring.fast_verify("track", b"message", b64url_encode(expected)) == 0


@given(st.binary(min_size=16, max_size=16))
def test_signatures_are_unpadded_urlsafe_base64(mac: bytes) -> None:
    assert _b64url_signature(mac) == b64url_encode(mac)
