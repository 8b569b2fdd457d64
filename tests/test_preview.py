"""Signed preview links: the grant format (forged, tampered, expired, another purpose:
ignored), the link and exit endpoints, what a previewing browser gets (the customer's or
audience's experiences, fetched for them; no tracking; private; a banner), what it never
does (pollute its own visitor cache, reach another visitor, report an event), the CLI."""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, quote_from_bytes, urlsplit

import httpx
import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from personalize_middleware import (
    ConfigurationError,
    Identity,
    Keyring,
    PersonalizeMiddleware,
    PersonalizeTemplates,
    TrackingLimits,
    preview_link,
    qa_link,
)
from personalize_middleware._grants import (
    DEVICE_USER_AGENTS,
    PREVIEW_COOKIE,
    decode_preview,
    decode_qa,
    encode_preview,
    encode_qa,
    parse_duration,
    safe_next,
)
from personalize_middleware.cli import main
from personalize_middleware.local import device_type
from tests.support.fake_backend import FakeBackend
from tests.support.tracking_helpers import beacon

SECRET = "preview-test-secret-0123456789"
KEYRING = Keyring([SECRET])

PAGE = """\
<!doctype html><body>
{% experience "hero" as hero %}<section{{ impression(hero) }}><h1>{{ hero.title }}</h1>
<p id="why">{{ hero.why.source }}/{{ hero.why.reason }}</p>
<button{{ track_click(hero, "Buy") }}>Buy</button></section>
{% else %}<h1>default</h1>{% endexperience %}
{{ personalize_script() }}
</body>"""


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


def make_middleware(backend: FakeBackend, **options: Any) -> PersonalizeMiddleware:
    templates = PersonalizeTemplates(
        env=jinja2.Environment(
            loader=jinja2.DictLoader({"page.html": PAGE}), autoescape=jinja2.select_autoescape()
        )
    )

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html")

    options.setdefault("preview", True)
    return PersonalizeMiddleware(
        Starlette(routes=[Route("/", page), Route("/landing", page)]),
        backend=backend,
        routes={"/": ["hero"], "/landing": ["hero"]},
        identify=header_identity,
        secret_key=SECRET,
        metadata_refresh=None,
        latency_budget=30.0,
        **options,
    )


def title(page: str) -> str:
    found = re.search(r"<h1>(.*?)</h1>", page)
    assert found is not None, page
    return html.unescape(found.group(1))


def hooks(page: str) -> list[str]:
    return re.findall(r' data-pz-(?:impression|click)="([^"]*)"', page)


def open_link(client: TestClient, link: str) -> httpx.Response:
    parts = urlsplit(link)
    response: httpx.Response = client.get(parts.path + "?" + parts.query, follow_redirects=False)
    return response


# -- the grant format -------------------------------------------------------------------------


def test_preview_and_qa_tokens_roundtrip() -> None:
    token = encode_preview(KEYRING, customer_id="alice", attributes={"utm_medium": "email"})
    grant = decode_preview(KEYRING, token)
    assert grant is not None
    assert (grant.customer_id, dict(grant.attributes)) == ("alice", {"utm_medium": "email"})
    assert grant.identity == Identity(customer_id="alice")
    assert grant.label == "customer alice, utm_medium=email"
    assert grant.expires - time.time() == pytest.approx(3600, abs=5)
    qa = decode_qa(KEYRING, encode_qa(KEYRING, label="anna"))
    assert qa is not None and qa.label == "anna"


def test_every_changed_character_is_refused() -> None:
    for token in (
        encode_preview(KEYRING, customer_id="alice", attributes={"utm_medium": "email"}),
        encode_preview(KEYRING, attributes={"device": "mobile"}),
    ):
        alphabet = "ABCQgwabcz0129-_."
        for index in range(len(token)):
            for replacement in alphabet.replace(token[index], ""):
                tampered = token[:index] + replacement + token[index + 1 :]
                assert decode_preview(KEYRING, tampered) is None, (index, replacement)


@given(st.text(max_size=400))
def test_garbage_never_verifies_nor_raises(text: str) -> None:
    assert decode_preview(KEYRING, text) is None
    assert decode_qa(KEYRING, text) is None


@given(st.data())
def test_hypothesis_tampering_is_refused(data: st.DataObject) -> None:
    token = encode_preview(KEYRING, customer_id="alice", attributes={"utm_medium": "email"})
    index = data.draw(st.integers(0, len(token) - 1))
    inserted = data.draw(st.text(min_size=1, max_size=3))
    mode = data.draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
    if mode == "replace":
        tampered = token[:index] + inserted + token[index + 1 :]
    elif mode == "insert":
        tampered = token[:index] + inserted + token[index:]
    elif mode == "delete":
        tampered = token[:index] + token[index + 1 :]
    else:
        tampered = token[:index]
    if tampered != token:
        assert decode_preview(KEYRING, tampered) is None


def test_edited_payload_another_key_another_purpose_or_expired_are_refused() -> None:
    import base64
    import json

    token = encode_preview(KEYRING, customer_id="alice")
    kind, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["c"] = "bob"  # another customer, same signature
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    assert decode_preview(KEYRING, f"{kind}.{forged}.{signature}") is None
    assert decode_preview(Keyring(["another-secret-0123456789"]), token) is None
    assert decode_qa(KEYRING, token) is None  # a preview token is not a QA token
    assert decode_preview(KEYRING, encode_qa(KEYRING)) is None  # nor the reverse
    assert decode_preview(KEYRING, token, now=time.time() + 3601) is None  # expired
    rotated = Keyring(["new-secret-0123456789abc", SECRET])
    assert decode_preview(rotated, token) is not None  # old keys verify until removed


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({}, "customer_id"),
        ({"customer_id": ""}, "customer_id"),
        ({"customer_id": "a\nb"}, "customer_id"),
        ({"attributes": {"device": "fridge"}}, "attributes"),
        ({"attributes": {"": "x"}}, "attribute name"),
        ({"attributes": {f"a{i}": "x" for i in range(40)}}, "attributes"),
        ({"customer_id": "a", "ttl": "2d"}, "ttl"),
        ({"customer_id": "a", "ttl": "soon"}, "ttl"),
        ({"customer_id": "a", "ttl": 0}, "ttl"),
    ],
)
def test_bad_previews_are_configuration_errors(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        encode_preview(KEYRING, **options)
    assert caught.value.field == field


def test_durations() -> None:
    assert [parse_duration(v) for v in (90, "90", "90s", "30m", "1h", "2d", " 1.5h ")] == [
        90,
        90,
        90,
        1800,
        3600,
        172800,
        5400,
    ]


def test_device_attribute_stands_for_a_user_agent_of_that_device() -> None:
    for device, user_agent in DEVICE_USER_AGENTS.items():
        assert device_type(user_agent) == device
    grant = decode_preview(KEYRING, encode_preview(KEYRING, attributes={"device": "mobile"}))
    assert grant is not None
    merged = grant.apply({"USER_AGENT": "curl/8", "utm_source": "x"})
    assert merged == {"USER_AGENT": DEVICE_USER_AGENTS["mobile"], "utm_source": "x"}
    assert grant.identity.visitor_id == "preview-" + grant.grant_id  # not the previewer's


def test_links() -> None:
    link = preview_link(
        "https://shop.example/landing?utm_source=x", secret_key=SECRET, customer_id="a"
    )
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "shop.example",
        "/_personalize/preview",
    )
    query = parse_qs(parts.query)
    assert query["next"] == ["/landing?utm_source=x"]
    assert decode_preview(KEYRING, query["token"][0]) is not None
    assert preview_link("/", secret_key=SECRET, customer_id="a", prefix="/shop/_p").startswith(
        "/shop/_p/preview?token="
    )
    assert urlsplit(qa_link("http://h/", secret_key=SECRET)).path == "/_personalize/qa"
    for bad in ("javascript:alert(1)", "landing", "ftp://h/", "", "//h"):
        with pytest.raises(ConfigurationError):
            preview_link(bad, secret_key=SECRET, customer_id="a")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/landing?x=1", "/landing?x=1"),
        ("/", "/"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("/a b", "/"),
        ("/é", "/"),
        ("/x\r\nSet-Cookie: a=b", "/"),
        (None, "/"),
        ("/" + "a" * 3000, "/"),
    ],
)
def test_redirect_targets_stay_on_the_site(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


# -- the endpoints and the previewing browser -------------------------------------------------


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def site(backend: FakeBackend) -> Iterator[tuple[TestClient, PersonalizeMiddleware]]:
    middleware = make_middleware(backend)
    with TestClient(middleware) as client:
        yield client, middleware


def test_a_preview_link_sets_the_cookie_and_shows_the_customer(
    site: tuple[TestClient, PersonalizeMiddleware], backend: FakeBackend
) -> None:
    client, middleware = site
    link = preview_link(
        "http://testserver/landing?utm_source=news", secret_key=SECRET, customer_id="alice"
    )
    answer = open_link(client, link)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/landing?utm_source=news"
    assert answer.headers["cache-control"] == "no-store"
    cookie = answer.headers["set-cookie"]
    assert (
        cookie.startswith(PREVIEW_COOKIE + "=pv1.")
        and "HttpOnly" in cookie
        and "SameSite=Lax" in cookie
    )
    max_age = int(re.search(r"Max-Age=(\d+)", cookie).group(1))  # type: ignore[union-attr]
    assert 3590 <= max_age <= 3600

    page = client.get("/landing?utm_source=news")
    assert title(page.text) == "hero:alice"
    assert backend.calls[-1]["customer_id"] == "alice"
    assert backend.calls[-1]["attributes"]["utm_source"] == "news"
    assert "network/preview" in page.text  # hero.why: fetched for the preview
    assert "Preview as <strong>customer alice</strong>" in page.text
    exit_link = re.search(r'class="pz-preview-exit" href="([^"]+)"', page.text)
    assert exit_link is not None
    assert html.unescape(exit_link.group(1)) == (
        "/_personalize/preview/exit?next=%2Flanding%3Futm_source%3Dnews"
    )
    # Nothing a preview shows can be reported: no hooks, no tracking script.
    assert hooks(page.text) == []
    assert "data-pz-endpoint" not in page.text
    assert page.headers["cache-control"] == "private, no-store"
    assert "Cookie" in page.headers["vary"]
    assert "pm_vid" not in page.headers.get("set-cookie", "")  # the visitor is not resolved

    gone = client.get(html.unescape(exit_link.group(1)), follow_redirects=False)
    assert gone.status_code == 303 and gone.headers["location"] == "/landing?utm_source=news"
    assert "Max-Age=0" in gone.headers["set-cookie"]
    client.cookies.delete(PREVIEW_COOKIE)  # what the browser does with Max-Age=0
    normal = client.get("/landing")
    assert title(normal.text).startswith("hero:") and title(normal.text) != "hero:alice"
    assert hooks(normal.text) and "pz-preview-banner" not in normal.text
    assert middleware.tracking is not None


def test_an_audience_preview_fetches_for_its_own_identity_and_attributes(
    site: tuple[TestClient, PersonalizeMiddleware], backend: FakeBackend
) -> None:
    client, _ = site
    own = client.get("/")  # the previewer, as an ordinary visitor first
    visitor = client.cookies["pm_vid"].split(".")[0]
    assert title(own.text) == f"hero:{visitor}"
    link = preview_link(
        "http://testserver/",
        secret_key=SECRET,
        attributes={"utm_medium": "email", "device": "mobile"},
    )
    open_link(client, link)
    page = client.get("/")
    call = backend.calls[-1]
    assert call["customer_id"].startswith("preview-") and call["customer_id"] != visitor
    assert call["attributes"]["utm_medium"] == "email"
    assert call["attributes"]["USER_AGENT"] == DEVICE_USER_AGENTS["mobile"]
    assert title(page.text) == f"hero:{call['customer_id']}"
    assert "Preview as <strong>device=mobile, utm_medium=email</strong>" in page.text
    calls = len(backend.calls)
    client.cookies.delete(PREVIEW_COOKIE)
    again = client.get("/")
    # Back to its own answer, from its own cache entry: the preview touched neither.
    assert title(again.text) == f"hero:{visitor}" and "cache/None" in again.text
    assert len(backend.calls) == calls
    assert all(
        c["customer_id"] != visitor or "utm_medium" not in c["attributes"] for c in backend.calls
    )


def test_a_preview_never_reaches_another_visitor(
    site: tuple[TestClient, PersonalizeMiddleware], backend: FakeBackend
) -> None:
    client, middleware = site
    open_link(client, preview_link("http://testserver/", secret_key=SECRET, customer_id="alice"))
    assert title(client.get("/").text) == "hero:alice"
    other = TestClient(middleware)  # another browser (no `with`: one lifespan is enough)
    assert title(other.get("/").text) != "hero:alice"
    # The real alice gets her own answer: the one the preview cached is hers anyway.
    assert title(other.get("/", headers={"x-user": "alice"}).text) == "hero:alice"
    assert title(other.get("/", headers={"x-user": "bob"}).text) == "hero:bob"


@pytest.mark.parametrize(
    "token",
    [
        encode_preview(Keyring(["someone-else-0123456789"]), customer_id="alice"),  # forged
        encode_preview(KEYRING, customer_id="alice", now=time.time() - 7200),  # expired
        encode_preview(KEYRING, customer_id="alice")[:-2] + "AA",  # tampered signature
        encode_qa(KEYRING),  # another purpose
        "pv1.e30.AAAAAAAAAAAAAAAAAAAAAA",
        "garbage",
    ],
    ids=["forged", "expired", "tampered", "qa-token", "empty-payload", "garbage"],
)
def test_bad_preview_links_and_cookies_give_the_normal_page(
    site: tuple[TestClient, PersonalizeMiddleware], token: str
) -> None:
    client, _ = site
    answer = client.get(
        "/_personalize/preview", params={"token": token, "next": "/"}, follow_redirects=False
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    assert "set-cookie" not in answer.headers
    client.cookies.set(PREVIEW_COOKIE, token)
    page = client.get("/")
    assert page.status_code == 200
    assert "pz-preview-banner" not in page.text and hooks(page.text)
    assert title(page.text) != "hero:alice"


def test_open_redirects_are_refused(site: tuple[TestClient, PersonalizeMiddleware]) -> None:
    client, _ = site
    token = encode_preview(KEYRING, customer_id="alice")
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        answer = client.get(
            "/_personalize/preview", params={"token": token, "next": target}, follow_redirects=False
        )
        assert answer.headers["location"] == "/"
        exit_answer = client.get(
            "/_personalize/preview/exit", params={"next": target}, follow_redirects=False
        )
        assert exit_answer.headers["location"] == "/"
    assert client.post("/_personalize/preview").status_code == 405


def test_previews_are_off_unless_enabled(backend: FakeBackend) -> None:
    with TestClient(make_middleware(backend, preview=False)) as client:
        link = preview_link("http://testserver/", secret_key=SECRET, customer_id="alice")
        answer = open_link(client, link)
        assert answer.status_code == 303 and "set-cookie" not in answer.headers
        client.cookies.set(PREVIEW_COOKIE, parse_qs(urlsplit(link).query)["token"][0])
        page = client.get("/")
        assert title(page.text) != "hero:alice" and "pz-preview-banner" not in page.text


@given(st.data())
@settings(
    max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
def test_tampered_preview_cookies_give_the_normal_page(
    site: tuple[TestClient, PersonalizeMiddleware], data: st.DataObject
) -> None:
    client, _ = site
    token = encode_preview(KEYRING, customer_id="alice")
    index = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.sampled_from("ABCDQgwxyz0189-_."))
    tampered = token[:index] + replacement + token[index + 1 :]
    client.cookies.set(PREVIEW_COOKIE, tampered)
    page = client.get("/")
    assert page.status_code == 200
    if tampered != token:
        assert title(page.text) != "hero:alice" and "pz-preview-banner" not in page.text
    client.cookies.delete(PREVIEW_COOKIE)


def test_a_preview_handle_kept_after_its_request_is_still_the_preview_s(
    backend: FakeBackend,
) -> None:
    """A page that kept its handle without reading anything (a route with no keys): the
    request's end lets go of its scope, and the identity resolved later is still the
    preview's customer, never the browser's visitor."""
    kept: list[Any] = []

    async def keep(request: Request) -> Response:
        kept.append(request.state.personalize)
        return Response("ok")

    middleware = PersonalizeMiddleware(
        Starlette(routes=[Route("/", keep)]),
        backend=backend,
        routes={},
        identify=header_identity,
        secret_key=SECRET,
        metadata_refresh=None,
        preview=True,
    )
    with TestClient(middleware) as client:
        open_link(
            client, preview_link("http://testserver/", secret_key=SECRET, customer_id="alice")
        )
        assert client.get("/").status_code == 200
    (handle,) = kept
    assert handle.identity is None
    assert asyncio.run(handle.resolve_identity()).customer_id == "alice"


# -- nothing of a preview reaches MoEngage ----------------------------------------------------


def test_a_previewing_browser_s_beacons_are_dropped(backend: FakeBackend) -> None:
    middleware = make_middleware(backend)
    assert middleware.tracking is not None
    middleware.tracking.limits = TrackingLimits.off()  # the beacons follow their page at once
    headers = {"origin": "http://testserver", "sec-fetch-site": "same-origin"}
    with TestClient(middleware) as client:
        page = client.get("/").text
        tokens = hooks(page)  # valid hooks of this visitor's own page
        assert len(tokens) == 2
        body = beacon(page)
        open_link(
            client, preview_link("http://testserver/", secret_key=SECRET, customer_id="alice")
        )
        answer = client.post("/_personalize/events", json=body, headers=headers)
        assert answer.status_code == 204
        assert middleware.devtools is not None and middleware.devtools.dropped_beacons == 1
        assert middleware.tracking is not None and middleware.tracking.stats.beacons == 0
        client.cookies.delete(PREVIEW_COOKIE)
        assert client.post("/_personalize/events", json=body, headers=headers).status_code == 204
        assert middleware.tracking.stats.accepted == 2
    # The batcher flushed on shutdown: only the events sent outside the preview arrived.
    assert sum(len(element["actions"]) for element in backend.events) == 2


def test_server_side_impressions_are_not_recorded_in_a_preview(backend: FakeBackend) -> None:
    middleware = make_middleware(backend, impressions="server")
    with TestClient(middleware) as client:
        open_link(
            client, preview_link("http://testserver/", secret_key=SECRET, customer_id="alice")
        )
        assert title(client.get("/").text) == "hero:alice"
        assert middleware.tracking is not None and middleware.tracking.stats.server_impressions == 0
        client.cookies.delete(PREVIEW_COOKIE)
        client.get("/")
        assert middleware.tracking.stats.server_impressions == 1
    assert [element["customer_id"] for element in backend.events] != ["alice"]
    assert all(element["customer_id"] != "alice" for element in backend.events)


# -- the CLI ----------------------------------------------------------------------------------


def test_cli_preview_mints_a_link(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PERSONALIZE_SECRET_KEY", SECRET)
    argv = [
        "preview",
        "--as-customer",
        "alice",
        "--attr",
        "utm_medium=email",
        "--attr",
        "device=mobile",
    ]
    assert main([*argv, "--ttl", "30m", "https://shop.example/landing"]) == 0
    out, err = capsys.readouterr()
    link = out.strip()
    assert link.startswith("https://shop.example/_personalize/preview?token=pv1.")
    grant = decode_preview(KEYRING, parse_qs(urlsplit(link).query)["token"][0])
    assert grant is not None and grant.customer_id == "alice"
    assert dict(grant.attributes) == {"utm_medium": "email", "device": "mobile"}
    assert grant.expires - time.time() == pytest.approx(1800, abs=5)
    assert "preview as customer alice, utm_medium=email, device=mobile" in err


def test_cli_qa_cookie_and_the_secret_sources(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    monkeypatch.delenv("PERSONALIZE_SECRET_KEY", raising=False)
    monkeypatch.delenv("MOENGAGE_API_SECRET", raising=False)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    assert (
        main(["qa-cookie", "--label", "anna", "--secret-key-file", str(secret_file), "http://h/"])
        == 0
    )
    out, err = capsys.readouterr()
    token = parse_qs(urlsplit(out.strip()).query)["token"][0]
    qa = decode_qa(KEYRING, token)
    assert qa is not None and qa.label == "anna"
    assert f"Cookie: pmdev_qa={token}" in err
    # No key anywhere: one clear line, exit 1.
    assert main(["qa-cookie", "http://h/"]) == 1
    assert "no signing key" in capsys.readouterr().err
    # The key the middleware derives from the API secret when it has no secret_key.
    monkeypatch.setenv("MOENGAGE_API_SECRET", "api-secret-0123456789")
    assert main(["preview", "--as-customer", "a", "http://h/"]) == 0
    token = parse_qs(urlsplit(capsys.readouterr().out.strip()).query)["token"][0]
    derived = Keyring.from_config(None, api_secret="api-secret-0123456789")
    assert decode_preview(derived, token) is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["preview", "http://h/"], "needs --as-customer, --attr or both"),
        (["preview", "--attr", "novalue", "http://h/"], "NAME=VALUE"),
        (["preview", "--as-customer", "a", "--ttl", "3d", "http://h/"], "ttl must be"),
        (["preview", "--as-customer", "a", "not-a-url"], "url must"),
        (["preview", "--as-customer", "a", "--attr", "device=toaster", "http://h/"], "device"),
        (["qa-cookie", "--ttl", "never", "http://h/"], "ttl must be"),
    ],
)
def test_cli_mistakes_are_one_line(
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PERSONALIZE_SECRET_KEY", SECRET)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@given(
    path=st.sampled_from(["/preview", "/preview/exit", "/qa", "/qa/exit"]),
    query=st.binary(max_size=300),
)
@settings(
    max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
def test_any_query_gets_a_redirect_on_the_site_never_an_error(
    site: tuple[TestClient, PersonalizeMiddleware], path: str, query: bytes
) -> None:
    client, _ = site
    # Any bytes, percent-encoded where a URL cannot carry them raw (the server decodes).
    raw = quote_from_bytes(query, safe="=&;/?:@,+$!*'()~")
    answer = client.get(f"/_personalize{path}?{raw}", follow_redirects=False)
    assert answer.status_code == 303
    assert safe_next(answer.headers["location"], "") == answer.headers["location"]
