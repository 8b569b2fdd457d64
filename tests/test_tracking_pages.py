"""The page-view manifest (``tracking/_pages``): in a page whose manifest will be written,
hooks before its script hold the render id and an index, the script tag (or, for a
fragment, a ``<template>`` after it) the page's hooks signed once. Every property of the
per-hook tokens holds: no forging, no other visitor, no other ``b_id``, no other page
view, no double counting."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.testclient import TestClient

from personalize_middleware import (
    ExperienceStore,
    Identity,
    InvalidTokenError,
    Personalization,
    PersonalizeMiddleware,
    setup_templates,
)
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN
from personalize_middleware._signing import Keyring
from personalize_middleware.tracking import (
    Tracking,
    TrackingLimits,
    decode_token,
)
from personalize_middleware.tracking._pages import MAX_PAGE_CHARS, decode_events, decode_page
from tests.support.tracking_helpers import (
    StaticBackend,
    beacon,
    context_for,
    hook_values,
    page_manifest,
)
from tests.support.tracking_helpers import page_view as tracked_page_view

KEYRING = Keyring(["pages-test-secret-0123456789"])
ALICE = Identity(customer_id="alice")
BOB = Identity(customer_id="bob")
B_IDS = ["Add to Cart", "Wishlist", '"><img src=x>', "Añadir"]


async def page_view(identity: Identity = ALICE) -> tuple[Personalization, Tracking]:
    backend = StaticBackend({"hero": {"Title": "Sale"}, "promo": {"Title": "Free shipping"}})
    tracking = Tracking(keyring=KEYRING, backend=backend)
    return await tracked_page_view(ExperienceStore(backend), tracking, identity), tracking


def render(handle: Personalization, tracking: Tracking) -> tuple[list[str], str | None]:
    """The hooks of a page (an impression per experience, the clicks on the hero), then
    its script tag: their values and the manifest."""
    hero, promo = handle.experience("hero"), handle.experience("promo")
    assert hero is not None and promo is not None
    tracking.open_manifest(handle)  # what PersonalizeTemplates does before rendering
    attrs = [tracking.impression_attrs(handle, hero), tracking.impression_attrs(handle, promo)]
    attrs += [tracking.click_attrs(handle, hero, b_id) for b_id in B_IDS]
    tag = str(tracking.script_tag(page=handle))
    return hook_values("".join(attrs)), page_manifest(tag)


def read(texts: list[str], page: str | None, identity: Identity = ALICE, **kw: Any) -> list[Any]:
    now = kw.pop("now", time.time())
    return decode_events(KEYRING, identity, texts, page=page, now=now, decoded={})


@pytest.mark.anyio
async def test_indexes_read_as_the_tokens_the_hooks_would_have_carried() -> None:
    handle, tracking = await page_view()
    values, manifest = render(handle, tracking)
    assert values == [f"{handle.render_id}~{i}" for i in range(6)] and manifest is not None
    hero, promo = handle.experience("hero"), handle.experience("promo")
    assert hero is not None and promo is not None
    # The same hooks as full tokens (what a page whose script comes first carries).
    full = [tracking.token_for(handle, hero), tracking.token_for(handle, promo)]
    full += [tracking.token_for(handle, hero, b_id) for b_id in B_IDS]
    expected = [decode_token(KEYRING, ALICE, text) for text in full]
    assert read(values, manifest) == expected
    assert [t.b_id for t in expected] == [None, None, *B_IDS]
    assert {t.render_id for t in expected} == {handle.render_id}
    assert expected[0].context == context_for("hero")
    # Each experience's part is in the manifest once, whatever its number of hooks.
    assert len(manifest.split(".")[0].split("~")) == 2
    # Any order, any subset, mixed with full tokens.
    rid = handle.render_id
    assert read([f"{rid}~5", full[0], f"{rid}~0"], manifest) == [
        expected[5],
        expected[0],
        expected[0],
    ]


@pytest.mark.anyio
async def test_a_manifest_is_the_visitor_s_own_and_cannot_be_altered() -> None:
    handle, tracking = await page_view()
    values, manifest = render(handle, tracking)
    assert manifest is not None
    with pytest.raises(InvalidTokenError, match="signature"):
        read(values, manifest, BOB)
    for index in range(0, len(manifest), 7):  # any character changed
        original = manifest[index]
        for replacement in "A~.0c_":
            if replacement != original:
                tampered = manifest[:index] + replacement + manifest[index + 1 :]
                with pytest.raises(InvalidTokenError):
                    read(values, tampered)
    # Another b_id can only be another hook of the same page: its index, listed.
    body, _, signature = manifest.rpartition(".")
    # "Wishlist" renamed "Buy now", the signature kept.
    renamed = body.replace("cV2lzaGxpc3Q", "cQnV5IG5vdw") + "." + signature
    assert renamed != manifest
    with pytest.raises(InvalidTokenError, match="signature"):
        read(values, renamed)


@pytest.mark.anyio
async def test_indexes_need_their_page_and_stay_within_it() -> None:
    handle, tracking = await page_view()
    values, manifest = render(handle, tracking)
    assert manifest is not None
    rid = handle.render_id
    with pytest.raises(InvalidTokenError, match="without"):
        read([f"{rid}~0"], None)
    with pytest.raises(InvalidTokenError, match="past"):
        read([f"{rid}~{len(values)}"], manifest)
    with pytest.raises(InvalidTokenError, match="another page view"):
        read(["AAAAAAAAAAAAAAAA~0"], manifest)  # an index of another page view's hook
    for odd in ("~0", f"{rid}~", f"{rid}~-1", f"{rid}~x", f"{rid}~00001", f"{rid}~1 ", "a.b~1"):
        with pytest.raises(InvalidTokenError):
            read([odd], manifest)
    with pytest.raises(InvalidTokenError, match="expired"):
        read(values, manifest, now=time.time() + tracking.token_ttl + 1)
    with pytest.raises(InvalidTokenError):
        decode_page(KEYRING, ALICE, "A" * (MAX_PAGE_CHARS + 1), now=time.time(), decoded={})


@pytest.mark.anyio
async def test_a_token_is_no_manifest_and_a_manifest_no_token() -> None:
    handle, tracking = await page_view()
    _, manifest = render(handle, tracking)
    hero = handle.experience("hero")
    assert manifest is not None and hero is not None
    token = tracking.token_for(handle, hero)
    assert token is not None
    with pytest.raises(InvalidTokenError):
        read([f"{handle.render_id}~0"], token)  # a token passed off as the page
    with pytest.raises(InvalidTokenError):
        read([manifest], None)  # the page passed off as a token


@pytest.mark.anyio
async def test_hooks_after_the_script_carry_full_tokens() -> None:
    # The script in <head>: every hook after it carries a token; its tag no manifest.
    handle, tracking = await page_view()
    tracking.open_manifest(handle)
    first = str(tracking.script_tag(page=handle))
    assert "data-pz-page" not in first
    hero = handle.experience("hero")
    assert hero is not None
    later = hook_values(str(tracking.click_attrs(handle, hero, "Add to Cart")))
    assert not later[0].startswith("~")
    assert decode_token(KEYRING, ALICE, later[0]).b_id == "Add to Cart"
    # A second script tag lists nothing new; hooks after the first manifest: tokens.
    handle, tracking = await page_view()
    _, manifest = render(handle, tracking)
    assert manifest is not None
    assert "data-pz-page" not in str(tracking.script_tag(page=handle))
    after = hook_values(str(tracking.impression_attrs(handle, hero)))
    assert decode_token(KEYRING, ALICE, after[0]).kind == "shown"


# -- through the middleware and the endpoint ---------------------------------------------------

SECRET = "pages-middleware-secret-0123456789"
FRAGMENT = """\
{% experience "hero" as hero %}<section{{ impression(hero) }}><h1>{{ hero.Title }}</h1>\
<button{{ track_click(hero, "Add to Cart") }}>Add</button></section>{% endexperience %}"""
PAGE = FRAGMENT + "{{ personalize_script() }}"


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


def make_app(backend: StaticBackend) -> tuple[Starlette, Tracking]:
    import jinja2

    loader = jinja2.DictLoader({"p": PAGE, "fragment": FRAGMENT, "data.txt": FRAGMENT})
    templates = Jinja2Templates(env=jinja2.Environment(loader=loader))
    setup_templates(templates)

    async def page(request: Request) -> Response:
        name = request.query_params.get("t", "p")
        media_type = "text/plain" if name == "data.txt" else None
        return templates.TemplateResponse(request, name, {}, media_type=media_type)

    tracking = Tracking(
        keyring=Keyring.from_config(SECRET), backend=backend, limits=TrackingLimits.off()
    )
    app = Starlette(routes=[Route("/", page)])
    wrapped = PersonalizeMiddleware(
        app,
        backend=backend,
        routes={"/": ["hero"]},
        identify=header_identity,
        secret_key=SECRET,
        metadata_refresh=None,
        tracking=tracking,
    )
    return wrapped, tracking  # type: ignore[return-value]


HEADERS = {"origin": "http://testserver", "sec-fetch-site": "same-origin"}


def test_a_page_s_beacon_counts_once_for_its_visitor_only() -> None:
    backend = StaticBackend({"hero": {"Title": "Hi"}})
    app, tracking = make_app(backend)
    with TestClient(app, headers={"x-user": "u-1"}) as client:
        text = client.get("/").text
        rid = hook_values(text)[0].partition("~")[0]
        assert hook_values(text) == [f"{rid}~0", f"{rid}~1"]
        assert re.search(r'<script defer src="[^"]+" integrity="[^"]+" data-pz-endpoint', text)
        body = beacon(text)
        assert "page" in body
        stranger = client.post(
            "/_personalize/events", json=body, headers={**HEADERS, "x-user": "u-2"}
        )
        assert stranger.status_code == 403
        assert client.post("/_personalize/events", json=body, headers=HEADERS).status_code == 204
        assert client.post("/_personalize/events", json=body, headers=HEADERS).status_code == 204
        for bad in (
            {"events": [f"{rid}~0"]},
            {"events": [f"{rid}~0"], "page": 3},
            {**body, "events": [f"{rid}~9"]},
        ):
            assert client.post("/_personalize/events", json=bad, headers=HEADERS).status_code in (
                400,
                403,
            )
        assert (tracking.stats.accepted, tracking.stats.replays) == (2, 2)
    actions = [
        (a["action"], a["attributes"].get("b_id")) for e in backend.events for a in e["actions"]
    ]
    assert actions == [(ACTION_SHOWN, None), (ACTION_CLICKED, "Add to Cart")]
    assert [e["customer_id"] for e in backend.events] == ["u-1"]


def test_a_fragment_gets_its_manifest_after_its_hooks() -> None:
    """A template without ``personalize_script()`` (a fragment swapped in by htmx, say):
    ``PersonalizeTemplates`` appends its manifest in an inert ``<template>``, and a beacon
    for it needs that manifest, not the page's around it."""
    from personalize_middleware.testing import click

    backend = StaticBackend({"hero": {"Title": "Hi"}})
    app, tracking = make_app(backend)
    with TestClient(app, headers={"x-user": "u-1"}) as client:
        page = client.get("/").text
        fragment = client.get("/?t=fragment")
        assert fragment.text.endswith("</template>") and fragment.text.count("data-pz-page") == 1
        assert fragment.headers["content-length"] == str(len(fragment.content))
        assert re.search(r'<template data-pz-page="[A-Za-z0-9_~.-]+"></template>$', fragment.text)
        # The document now holds both: each hook goes with its own page view's manifest.
        document = page + fragment.text
        assert click(client, document, "Add to Cart", headers=HEADERS) == 204  # the page's
        own = beacon(fragment.text, hook_values(fragment.text, "click"))  # its own manifest
        assert client.post("/_personalize/events", json=own, headers=HEADERS).status_code == 204
        crossed = {"events": [hook_values(fragment.text)[0]], "page": page_manifest(page)}
        assert client.post("/_personalize/events", json=crossed, headers=HEADERS).status_code == 403
        # Not HTML: no manifest can be appended, so the hooks carry full tokens.
        text = client.get("/?t=data.txt").text
        assert "<template" not in text and all("~" not in v for v in hook_values(text))
        assert tracking.stats.accepted == 2  # the page's click and the fragment's
