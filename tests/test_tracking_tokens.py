"""Tracking tokens: signed, bound to the visitor, expiring, rotatable, compact, no PII;
the page-view fast path (parts cached per experience and per page) signs the same tokens."""

from __future__ import annotations

import json
import re
import time
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalize_middleware import (
    Experience,
    ExperienceStore,
    Identity,
    Personalization,
    TemplateUsageError,
)
from personalize_middleware._signing import Keyring, b64url_decode, b64url_encode
from personalize_middleware.tracking import Tracking
from personalize_middleware.tracking._pages import decode_events
from personalize_middleware.tracking._tokens import (
    InvalidTokenError,
    TrackingToken,
    _experience_part,
    _identity_digest,
    decode_token,
    decode_tokens,
    encode_token,
    token_signer,
    validate_b_id,
)
from tests.support.tracking_helpers import (
    StaticBackend,
    api_experience,
    context_for,
    page_manifest,
)
from tests.support.tracking_helpers import page_view as tracked_page_view

KEYRING = Keyring(["k" * 32])
ALICE = Identity(customer_id="alice@example.com")
BOB = Identity(customer_id="bob@example.com")


def hmac_token(label: bytes, identity: Identity, body: str) -> str:
    """A token signed as the HMAC formats did (``pz-track-3``, ``pz-track-2``): the
    "track" HMAC over ``label`` NUL, the identity digest and the body."""
    signed = label + b"\x00" + _identity_digest(identity) + body.encode()
    return body + "." + KEYRING.sign("track", signed)


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


@pytest.mark.parametrize("render_id", [f"r-{i}" for i in range(8)])
def test_every_changed_character_is_refused(render_id: str) -> None:
    """Every position, every replacement character: including the signature's last
    character, whose low bits base64 decoding would ignore (several tokens, so each
    possible last character is met)."""
    text = encode_token(KEYRING, ALICE, token(kind="clicked", b_id="Wishlist", render_id=render_id))
    assert decode_token(KEYRING, ALICE, text).b_id == "Wishlist"
    alphabet = "ABCQgwabc012-_."
    for index in range(len(text)):
        for replacement in alphabet.replace(text[index], ""):
            tampered = text[:index] + replacement + text[index + 1 :]
            with pytest.raises(InvalidTokenError):
                decode_token(KEYRING, ALICE, tampered)


def test_re_signed_payload_with_changed_b_id_is_refused() -> None:
    """Editing any field (another b_id, a click made an impression) needs the server key."""
    text = encode_token(KEYRING, ALICE, token(kind="clicked", b_id="Wishlist"))
    experience, render_id, expires, element, signature = text.split(".")
    assert b64url_decode(element[1:]) == b"Wishlist"
    renamed = "c" + b64url_encode(b"Buy Now")
    for forged in (
        f"{experience}.{render_id}.{expires}.{renamed}.{signature}",
        f"{experience}.{render_id}.{expires}.s.{signature}",
        f"{experience}.{render_id}.{int(expires) + 3600}.{element}.{signature}",
        f"{experience}.other-render.{expires}.{element}.{signature}",
    ):
        with pytest.raises(InvalidTokenError, match="signature"):
            decode_token(KEYRING, ALICE, forged)
    other_ring = Keyring(["o" * 32])
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, ALICE, encode_token(other_ring, ALICE, token()))


def test_expiry_is_written_in_milliseconds() -> None:
    """The endpoint derives the render time from the expiry: whole seconds would blur
    it by up to a second, more than the impression dwell it checks."""
    text = encode_token(KEYRING, ALICE, token(expires=1_900_000_000.123))
    assert text.split(".")[2] == "1900000000123"
    assert decode_token(KEYRING, ALICE, text, now=1_800_000_000).expires == 1_900_000_000.123


def test_tokens_of_the_previous_format_still_verify() -> None:
    """Pages rendered before an upgrade (``pz-track-2``, expiry in whole seconds) keep
    reporting until their tokens expire; still bound to their visitor and signature."""
    expires = int(time.time()) + 600
    body = f"{_experience_part('hero-banner', context_for('hero-banner'))}.r-1.{expires}.s"
    legacy = hmac_token(b"pz-track-2", ALICE, body)
    read = decode_token(KEYRING, ALICE, legacy)
    assert (read.kind, read.key, read.render_id, read.expires) == (
        "shown",
        "hero-banner",
        "r-1",
        expires,
    )
    with pytest.raises(InvalidTokenError, match="signature"):
        decode_token(KEYRING, BOB, legacy)
    with pytest.raises(InvalidTokenError, match="expired"):
        decode_token(KEYRING, ALICE, legacy, now=expires + 1)
    with pytest.raises(InvalidTokenError, match="signature"):  # no other label is read
        decode_token(KEYRING, ALICE, hmac_token(b"pz-track-1", ALICE, body))


def test_tokens_signed_with_hmac_still_verify() -> None:
    """Pages rendered before the BLAKE2b tokens (``pz-track-3``: HMAC-SHA256, the same
    fields) keep reporting until they expire, bound to their visitor."""
    original = token(expires=time.time() + 600)
    current = encode_token(KEYRING, ALICE, original)
    body = current.rpartition(".")[0]
    previous = hmac_token(b"pz-track-3", ALICE, body)
    assert previous != current
    assert decode_token(KEYRING, ALICE, previous) == decode_token(KEYRING, ALICE, current)
    with pytest.raises(InvalidTokenError, match="signature"):
        decode_token(KEYRING, BOB, previous)
    with pytest.raises(InvalidTokenError, match="signature"):  # the HMAC under the new label
        decode_token(KEYRING, ALICE, hmac_token(b"pz-track-4", ALICE, body))


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
    body, _, signature = text.rpartition(".")
    signed = b"pz-track-4\x00" + _identity_digest(ALICE) + body.encode()
    assert KEYRING.fast_verify("track", signed, signature) == 0
    assert KEYRING.fast_verify("visitor", signed, signature) is None
    assert KEYRING.verify("visitor", signed, signature) is None
    assert KEYRING.verify("visitor", body.encode(), signature) is None
    assert (
        KEYRING.verify(
            "track", b"pz-track-3\x00" + _identity_digest(ALICE) + body.encode(), signature
        )
        is None
    )


def test_page_shows_no_customer_id() -> None:
    text = encode_token(KEYRING, ALICE, token())
    experience = zlib.decompress(b64url_decode(text.split(".")[0]), -15).decode()
    assert json.loads(experience) == ["hero-banner", context_for("hero-banner")]
    assert "alice" not in experience and "alice" not in text


def test_token_is_compact() -> None:
    """A typical experience_context fits in well under 400 characters; the longest b_id
    (128 characters of 2-byte UTF-8) adds about 340."""
    text = encode_token(KEYRING, ALICE, token(kind="clicked", b_id="Add to Cart"))
    assert len(text) < 400
    assert text.isascii() and '"' not in text and "<" not in text
    longest = encode_token(KEYRING, ALICE, token(kind="clicked", b_id="é" * 128))
    assert len(longest) < 700


V1_TOKEN = (  # the first format: <deflated JSON payload>.<signature>, never accepted now
    "i1YyVKpWKlbSyc7LK0pSslJKzMvIzC9KVKrVUSouKcrPS1fSUTLUMTA00jEwMDQyMQAA.AAAAAAAAAAAAAAAAAAAAAA"
)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "a.b.c", ".sig", "payload.", "é.x", "x" * 9000, None, 42, ["a.b"], V1_TOKEN],
)
def test_garbage_is_invalid(text: object) -> None:
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, ALICE, text)


def _deflated(raw: bytes) -> str:
    return b64url_encode(zlib.compress(raw, 9, -15))


GOOD_PART = _deflated(json.dumps(["k", {"cid": "1"}]).encode())
FAR_EXPIRY = 2**45  # the expiry field is in milliseconds: year 3084


def _sign_raw(body: str) -> str:
    """A correctly signed token around an arbitrary body (as if our key had leaked into
    a bug): the reader must still refuse anything that is not the token shape."""
    return body + "." + token_signer(KEYRING, ALICE).sign(body.encode())


def test_signed_body_of_the_right_shape_reads() -> None:
    """The control for the cases below: the same helper signs a readable token."""
    read = decode_token(KEYRING, ALICE, _sign_raw(f"{GOOD_PART}.r.{FAR_EXPIRY}.s"))
    assert (read.kind, read.key, read.context, read.render_id) == ("shown", "k", {"cid": "1"}, "r")


@pytest.mark.parametrize(
    "body",
    [
        f"{GOOD_PART}.r.{FAR_EXPIRY}",  # a field missing
        f"{GOOD_PART}.r.{FAR_EXPIRY}.s.s",  # one too many
        f"{GOOD_PART}.r.{FAR_EXPIRY}.x",  # unknown element kind
        f"{GOOD_PART}.r.{FAR_EXPIRY}.c",  # click without b_id
        f"{GOOD_PART}.r.{FAR_EXPIRY}.sQg",  # impression with more after the kind
        f"{GOOD_PART}.r.{FAR_EXPIRY}.c!!",  # b_id not base64
        f"{GOOD_PART}.r.{FAR_EXPIRY}.c_w",  # b_id not UTF-8
        f"{GOOD_PART}..{FAR_EXPIRY}.s",  # empty render id
        f"{GOOD_PART}.r.soon.s",  # expiry not a number
        f"{GOOD_PART}.r.{'9' * 5000}.s",  # expiry absurdly long
        f"{GOOD_PART}.r.-5.s",
        f"{_deflated(json.dumps({'v': 1}).encode())}.r.{FAR_EXPIRY}.s",  # not a list
        f"{_deflated(json.dumps([1, {}]).encode())}.r.{FAR_EXPIRY}.s",  # key not a string
        f"{_deflated(json.dumps(['k', []]).encode())}.r.{FAR_EXPIRY}.s",  # context not an object
        f"{_deflated(json.dumps(['k', {}, 3]).encode())}.r.{FAR_EXPIRY}.s",
        f"{_deflated(b'not json')}.r.{FAR_EXPIRY}.s",
        f"{b64url_encode(json.dumps(['k', {}]).encode())}.r.{FAR_EXPIRY}.s",  # not deflated
        f"!!.r.{FAR_EXPIRY}.s",
    ],
)
def test_signed_but_wrong_shape_is_invalid(body: str) -> None:
    with pytest.raises(InvalidTokenError):
        decode_token(KEYRING, ALICE, _sign_raw(body))


def test_signed_oversized_payload_is_invalid() -> None:
    bomb = _deflated(b"[" + b" " * 100_000 + b'"k",{}]')
    with pytest.raises(InvalidTokenError, match="too large"):
        decode_token(KEYRING, ALICE, _sign_raw(f"{bomb}.r.{FAR_EXPIRY}.s"))


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


# -- the page-view fast path (Tracking.token_for / impression_attrs / click_attrs) -----------


async def page_view(
    backend: StaticBackend, store: ExperienceStore, tracking: Tracking, identity: Identity
) -> Personalization:
    return await tracked_page_view(store, tracking, identity)


@pytest.fixture
def site() -> tuple[StaticBackend, ExperienceStore, Tracking]:
    backend = StaticBackend({"hero": {"Title": "Sale"}, "promo": {"Title": "Free shipping"}})
    return backend, ExperienceStore(backend), Tracking(keyring=KEYRING, backend=backend)


@pytest.mark.anyio
async def test_two_page_views_differ_only_in_the_page_part(site: tuple[Any, ...]) -> None:
    """The experience part is encoded once per experience and reused; the render id and
    expiry are per page view; every token verifies as what it was minted for."""
    backend, store, tracking = site
    first, second = [await page_view(backend, store, tracking, ALICE) for _ in range(2)]
    hero = first.experience("hero")
    assert hero is not None and second.experience("hero") is hero  # the cached object
    for b_id in (None, "Add to Cart"):
        one, two = (tracking.token_for(h, hero, b_id) for h in (first, second))
        assert one is not None and two is not None
        a, b = one.split("."), two.split(".")
        assert a[0] == b[0] and a[3] == b[3]  # experience and element parts: the same
        assert (a[1], b[1]) == (first.render_id, second.render_id) and a[1] != b[1]
        for text, handle in ((one, first), (two, second)):
            read = decode_token(KEYRING, ALICE, text)
            assert (read.key, read.context, read.b_id) == ("hero", context_for("hero"), b_id)
            assert read.render_id == handle.render_id
            assert read.expires >= int(time.time() + tracking.token_ttl) - 5
    # The fast path signs exactly what the one-off encoder signs.
    read = decode_token(KEYRING, ALICE, tracking.token_for(first, hero, "Wishlist") or "")
    assert tracking.token_for(first, hero, "Wishlist") == encode_token(KEYRING, ALICE, read)


@pytest.mark.anyio
async def test_experience_part_of_another_experience_is_refused(site: tuple[Any, ...]) -> None:
    backend, store, tracking = site
    handle = await page_view(backend, store, tracking, ALICE)
    hero, promo = handle.experience("hero"), handle.experience("promo")
    assert hero is not None and promo is not None
    for b_id in (None, "Add to Cart"):
        for_hero = (tracking.token_for(handle, hero, b_id) or "").split(".")
        for_promo = (tracking.token_for(handle, promo, b_id) or "").split(".")
        swapped = ".".join([for_promo[0], *for_hero[1:]])
        with pytest.raises(InvalidTokenError, match="signature"):
            decode_token(KEYRING, ALICE, swapped)
        # Nor the hero's key with the promo's context, re-encoded the way we encode.
        mixed = _deflated(
            json.dumps(["hero", context_for("promo")], separators=(",", ":")).encode()
        )
        with pytest.raises(InvalidTokenError, match="signature"):
            decode_token(KEYRING, ALICE, ".".join([mixed, *for_hero[1:]]))
        # Both genuine tokens of the page read as what they were minted for.
        assert decode_tokens(KEYRING, ALICE, [".".join(for_hero), ".".join(for_promo)])[1].key == (
            "promo"
        )


@pytest.mark.anyio
async def test_page_tokens_are_the_visitors_own(site: tuple[Any, ...]) -> None:
    backend, store, tracking = site
    alice = await page_view(backend, store, tracking, ALICE)
    bob = await page_view(backend, store, tracking, BOB)
    for handle, owner, other in ((alice, ALICE, BOB), (bob, BOB, ALICE)):
        experience = handle.experience("hero")
        assert experience is not None
        text = tracking.token_for(handle, experience, "Add to Cart")
        assert decode_token(KEYRING, owner, text).b_id == "Add to Cart"
        with pytest.raises(InvalidTokenError, match="signature"):
            decode_token(KEYRING, other, text)
        assert "alice" not in (text or "") and "bob" not in (text or "")


@pytest.mark.anyio
async def test_unattributable_visitor_gets_no_token(site: tuple[Any, ...]) -> None:
    backend, store, tracking = site
    by_email = await page_view(backend, store, tracking, Identity(user_identifiers={"u_em": "e"}))
    experience = by_email.experience("hero")
    assert experience is not None
    assert tracking.token_for(by_email, experience) is None
    assert tracking.click_attrs(by_email, experience, "Add to Cart") == ""
    with pytest.raises(TemplateUsageError):  # a bad b_id is still the template's mistake
        tracking.click_attrs(by_email, experience, "")


@pytest.mark.anyio
async def test_click_hook_checks_every_b_id_and_keeps_few(site: tuple[Any, ...]) -> None:
    backend, store, tracking = site
    handle = await page_view(backend, store, tracking, ALICE)
    hero = handle.experience("hero")
    assert hero is not None
    b_ids = [f"button {i}" for i in range(300)]
    tracking.open_manifest(handle)
    attrs = [tracking.click_attrs(handle, hero, b_id) for b_id in b_ids * 2]  # indexes
    texts = [str(a).split('"')[1] for a in attrs]
    manifest = page_manifest(str(tracking.script_tag(page=handle)))
    read = decode_events(KEYRING, ALICE, texts, page=manifest, now=time.time(), decoded={})
    assert [t.b_id for t in read] == b_ids * 2
    after = [str(tracking.click_attrs(handle, hero, b_id)).split('"')[1] for b_id in b_ids]
    assert [t.b_id for t in decode_tokens(KEYRING, ALICE, after)] == b_ids  # full tokens
    assert len(tracking._click_parts) <= 256
    for bad in ("", "x" * 129, "a\nb", ["a"], {"a": 1}, None):
        with pytest.raises(TemplateUsageError):
            tracking.click_attrs(handle, hero, bad)


@pytest.mark.anyio
async def test_derived_encoding_is_not_part_of_the_experience(site: tuple[Any, ...]) -> None:
    backend, store, tracking = site
    handle = await page_view(backend, store, tracking, ALICE)
    hero = handle.experience("hero")
    assert hero is not None
    fresh = Experience.from_api("hero", api_experience("hero", {"Title": "Sale"}))
    before = repr(hero)
    assert tracking.token_for(handle, hero) is not None
    assert hero.derived and not fresh.derived  # the cache is filled on first use
    assert hero == fresh and repr(hero) == before == repr(fresh)
    assert hero.to_api() == fresh.to_api()


def test_decoded_experience_memo_holds_only_verified_parts_and_stays_bounded() -> None:
    memo: dict[str, Any] = {}
    alice_token = encode_token(KEYRING, ALICE, token())
    # Bob's token read as Alice's fails before its experience part is decoded.
    with pytest.raises(InvalidTokenError, match="signature"):
        decode_tokens(
            KEYRING, ALICE, [encode_token(KEYRING, BOB, token(key="other"))], decoded=memo
        )
    assert memo == {}
    first = decode_tokens(KEYRING, ALICE, [alice_token], decoded=memo)[0]
    assert list(memo) == [alice_token.split(".")[0]]
    again = decode_tokens(KEYRING, BOB, [encode_token(KEYRING, BOB, token())], decoded=memo)[0]
    assert again.context is first.context and again.context == context_for("hero-banner")
    with pytest.raises(TypeError):  # shared between beacons, so read-only
        again.context["cid"] = "changed"  # type: ignore[index]
    many = [encode_token(KEYRING, ALICE, token(key=f"k{i}")) for i in range(1100)]
    read = decode_tokens(KEYRING, ALICE, many, decoded=memo)
    assert [t.key for t in read] == [f"k{i}" for i in range(1100)]
    assert 0 < len(memo) <= 1024


_ATTRIBUTE = re.compile(r' data-pz-(impression|click)="([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+){4})"')


@pytest.mark.anyio
async def test_hook_attributes_need_no_escaping(site: tuple[Any, ...]) -> None:
    """The hooks write tokens without escaping them: every character of every token, for
    any b_id (quotes, angle brackets, ampersands, any script), is base64url or a dot, and
    each verifies as what it was minted for."""
    backend, store, tracking = site
    handle = await page_view(backend, store, tracking, ALICE)
    hero = handle.experience("hero")
    assert hero is not None
    b_ids = ['"><script>alert(1)</script>', "a&amp;b", "Añadir al carrito", "'`=", "x" * 128]
    for script_first in (False, True):
        handle.tracking_state = None  # a new page view, its manifest written
        tracking.open_manifest(handle)
        first = str(tracking.script_tag(page=handle)) if script_first else ""
        written = [str(tracking.impression_attrs(handle, hero))]
        written += [str(tracking.click_attrs(handle, hero, b_id)) for b_id in b_ids]
        tag = first or str(tracking.script_tag(page=handle))
        manifest = _MANIFEST.search(tag)
        assert (manifest is None) is script_first, tag
        values = []
        for attribute in written:
            match = (_ATTRIBUTE if script_first else _INDEXED).fullmatch(attribute)
            assert match is not None, attribute
            values.append(match.group(2))
        read = decode_events(
            KEYRING,
            ALICE,
            values,
            page=manifest.group(1) if manifest else None,
            now=time.time(),
            decoded={},
        )
        assert [t.b_id for t in read] == [None, *b_ids]
        assert [t.kind for t in read] == ["shown"] + ["clicked"] * len(b_ids)


_INDEXED = re.compile(r' data-pz-(impression|click)="([A-Za-z0-9_-]{16}~[0-9]+)"')
_MANIFEST = re.compile(r' data-pz-page="([A-Za-z0-9_~-]+(?:\.[A-Za-z0-9_~-]+){4})"')
