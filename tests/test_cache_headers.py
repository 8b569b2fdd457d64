"""Cache headers of personal responses (hardening issue, finding 1).

The attack: headers were matched by substring (``x-no-store`` passed for ``no-store``,
``X-Cookie-Consent`` for ``Cookie``), ``CDN-Cache-Control``/``Surrogate-Control`` went
through untouched, and a page that read personalization lazily (in a streamed body) or
only resolved the identity kept the app's ``public, max-age=600`` -- the latter while
sending ``Set-Cookie: pm_vid``, so a shared cache could hand one visitor id to everyone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from personalize_middleware import PersonalizeMiddleware
from personalize_middleware._headers import (
    ResponseGate,
    cache_directives,
    make_private,
    vary_tokens,
)
from tests.support.fake_backend import FakeBackend

SECRET = "test-secret-key-0123456789abcdef"
PUBLIC = {"Cache-Control": "public, max-age=600"}
# The headers that override Cache-Control for one kind of cache; removed when personal.
OVERRIDES = ("cdn-cache-control", "surrogate-control", "edge-control", "x-accel-expires")


def is_override(name: str) -> bool:
    name = name.lower()
    return name in OVERRIDES or name.endswith("-cdn-cache-control")


RELATED = ("cache-control", "vary", "set-cookie")


def is_related(name: str) -> bool:
    return name.lower() in RELATED or is_override(name)


def private_of(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """What a cache would read from ``headers``: the Cache-Control directives, the Vary
    tokens (of every line), and the override headers left."""
    directives: list[bytes] = []
    vary: list[bytes] = []
    overrides: list[bytes] = []
    for key, value in headers:
        name = key.lower()
        if name == b"cache-control":
            directives += [d for d, _ in cache_directives(value)]
        elif name == b"vary":
            vary += vary_tokens(value)
        elif is_override(name.decode("latin-1")):
            overrides.append(name)
    return {"directives": directives, "vary": vary, "overrides": overrides}


def decorated(headers: list[tuple[bytes, bytes]], set_cookie: bytes | None = None) -> Any:
    message: Message = {"type": "http.response.start", "status": 200, "headers": headers}
    make_private(message, set_cookie=set_cookie)
    return message["headers"]


# -- token parsing ---------------------------------------------------------------------------


def test_cache_control_is_read_as_directives_not_substrings() -> None:
    # The attack string: "x-no-store" is an unknown extension, not no-store.
    assert cache_directives(b"s-maxage=600, x-no-store") == [
        (b"s-maxage", b"600"),
        (b"x-no-store", None),
    ]
    assert cache_directives(b"No-Store,PRIVATE , max-age = 0") == [
        (b"no-store", None),
        (b"private", None),
        (b"max-age", b"0"),
    ]
    # A comma (and "no-store") inside a quoted argument neither splits nor counts.
    assert cache_directives(b'private="Set-Cookie, no-store", max-age=5') == [
        (b"private", b"Set-Cookie, no-store"),
        (b"max-age", b"5"),
    ]
    assert cache_directives(b'ext="a\\"b,c", no-store-ish,,  , public') == [
        (b"ext", b'a"b,c'),
        (b"no-store-ish", None),
        (b"public", None),
    ]
    assert cache_directives(b"no-store x") == [(b"no-store x", None)]  # not one token
    assert cache_directives(b"") == []


def test_vary_is_read_as_field_names() -> None:
    assert vary_tokens(b"X-Cookie-Consent") == [b"x-cookie-consent"]
    assert vary_tokens(b" Accept-Encoding ,cookie,, *") == [b"accept-encoding", b"cookie", b"*"]


def test_the_two_attack_headers_are_made_private() -> None:
    headers = decorated(
        [
            (b"content-type", b"text/html"),
            (b"cache-control", b"s-maxage=600, x-no-store"),
            (b"vary", b"X-Cookie-Consent"),
        ]
    )
    assert headers == [
        (b"content-type", b"text/html"),
        (b"vary", b"X-Cookie-Consent, Cookie"),
        (b"cache-control", b"private, no-store"),
    ]


def test_every_cache_control_line_is_replaced_but_no_transform_is_kept() -> None:
    headers = decorated(
        [
            (b"Cache-Control", b"public, must-understand, no-store"),
            (b"cache-control", b"No-Transform, immutable"),
        ]
    )
    assert [v for k, v in headers if k.lower() == b"cache-control"] == [
        b"private, no-store, no-transform"
    ]
    # A quoted "no-transform" is an argument, not the directive.
    headers = decorated([(b"cache-control", b'private="no-transform", max-age=9')])
    assert (b"cache-control", b"private, no-store") in headers


def test_cdn_and_surrogate_headers_are_removed() -> None:
    headers = decorated(
        [
            (b"cdn-cache-control", b"max-age=600"),
            (b"Surrogate-Control", b"max-age=600"),
            (b"cloudflare-cdn-cache-control", b"max-age=600"),
            (b"edge-control", b"!no-store, max-age=600"),
            (b"x-accel-expires", b"600"),
            (b"surrogate-key", b"home"),  # a purge tag, not a caching rule: kept
        ]
    )
    assert headers == [
        (b"surrogate-key", b"home"),
        (b"cache-control", b"private, no-store"),
        (b"vary", b"Cookie"),
    ]


def test_vary_keeps_cookie_or_star_and_joins_lines() -> None:
    assert (b"vary", b"Accept-Encoding, cookie") in decorated(
        [(b"vary", b"Accept-Encoding, cookie")]
    )
    assert (b"vary", b"*") in decorated([(b"vary", b"*")])
    assert decorated([(b"vary", b"Accept-Encoding"), (b"x", b"1"), (b"vary", b"Origin")]) == [
        (b"vary", b"Accept-Encoding, Origin, Cookie"),
        (b"x", b"1"),
        (b"cache-control", b"private, no-store"),
    ]
    assert decorated([(b"vary", b"")])[0] == (b"vary", b"Cookie")
    assert decorated([], set_cookie=b"pm_vid=1") == [
        (b"cache-control", b"private, no-store"),
        (b"vary", b"Cookie"),
        (b"set-cookie", b"pm_vid=1"),
    ]


def test_headers_given_as_any_iterable_are_read_once_and_not_mutated() -> None:
    app_headers = [(b"content-type", b"text/html"), (b"vary", b"Accept-Encoding")]
    for given_headers in (iter(app_headers), tuple(app_headers), app_headers):
        message: Message = {"type": "http.response.start", "headers": given_headers}
        make_private(message)
        assert message["headers"] == [
            (b"content-type", b"text/html"),
            (b"vary", b"Accept-Encoding, Cookie"),
            (b"cache-control", b"private, no-store"),
        ]
    assert app_headers == [(b"content-type", b"text/html"), (b"vary", b"Accept-Encoding")]
    message = {"type": "http.response.start", "headers": iter([(b"etag", b'"1"')])}
    make_private(message)
    assert message["headers"][0] == (b"etag", b'"1"')


# -- property: any header set comes out uncacheable ------------------------------------------

REAL_DIRECTIVES = [
    "public",
    "private",
    "no-store",
    "no-cache",
    "no-transform",
    "must-revalidate",
    "proxy-revalidate",
    "must-understand",
    "immutable",
    "max-age",
    "s-maxage",
    "stale-while-revalidate",
    "stale-if-error",
]
LOOK_ALIKES = ["x-no-store", "no-store-ish", "no-stored", "noprivate", "private-ish", "nostore"]
ARGUMENTS = st.one_of(
    st.none(),
    st.integers(0, 10**6).map(str),
    st.sampled_from(["no-store", "private", "Set-Cookie"]),
    # Quoted strings with commas, "no-store", escaped quotes and backslashes.
    st.lists(st.sampled_from(["no-store", "private", ",", " ", "Cookie", '\\"', "\\\\", "a"])).map(
        lambda parts: '"' + "".join(parts) + '"'
    ),
)
DIRECTIVE = st.tuples(
    st.sampled_from(REAL_DIRECTIVES + LOOK_ALIKES).flatmap(
        lambda name: st.sampled_from([name, name.upper(), name.title()])
    ),
    ARGUMENTS,
)
SEPARATORS = st.sampled_from([", ", ",", " , ", ",\t", ", ,"])


@st.composite
def cache_control(draw: st.DrawFn) -> tuple[str, bool]:
    """A Cache-Control value and whether it holds a real ``no-transform`` directive."""
    directives = draw(st.lists(DIRECTIVE, max_size=6))
    parts = [name if arg is None else f"{name}={arg}" for name, arg in directives]
    value = ""
    for i, part in enumerate(parts):
        value += (draw(SEPARATORS) if i else "") + part
    return value, any(name.lower() == "no-transform" for name, _ in directives)


VARY_NAMES = [
    "Accept-Encoding",
    "X-Cookie-Consent",
    "Cookies",
    "Cookie-ish",
    "Set-Cookie",
    "Cookie",
    "cookie",
    "*",
    "Origin",
]
VARY = st.lists(st.sampled_from(VARY_NAMES), max_size=4).map(", ".join)
OVERRIDE_NAMES = [
    "CDN-Cache-Control",
    "cdn-cache-control",
    "Surrogate-Control",
    "Cloudflare-CDN-Cache-Control",
    "Edge-Control",
    "X-Accel-Expires",
]
OVERRIDE_VALUES = st.sampled_from(
    ["max-age=600", "public, s-maxage=86400", "!no-store, max-age=60", "600", "none"]
)
# Unrelated headers, some named like the related ones.
UNRELATED_NAMES = [
    "content-type",
    "etag",
    "x-cache-control",
    "cache-controls",
    "x-vary",
    "surrogate-key",
    "cdn-loop",
    "x-cdn-cache-control-ish",
    "Content-Length",
]
UNRELATED_VALUES = st.sampled_from(["text/html", '"v1"', "no-store", "Cookie", "public", ""])


@st.composite
def header_sets(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes]], bool]:
    headers: list[tuple[str, str]] = []
    no_transform = False
    for _ in range(draw(st.integers(0, 3))):
        value, has = draw(cache_control())
        no_transform = no_transform or has
        headers.append((draw(st.sampled_from(["cache-control", "Cache-Control"])), value))
    for _ in range(draw(st.integers(0, 3))):
        headers.append((draw(st.sampled_from(["vary", "Vary"])), draw(VARY)))
    for _ in range(draw(st.integers(0, 3))):
        headers.append((draw(st.sampled_from(OVERRIDE_NAMES)), draw(OVERRIDE_VALUES)))
    for _ in range(draw(st.integers(0, 5))):
        headers.append((draw(st.sampled_from(UNRELATED_NAMES)), draw(UNRELATED_VALUES)))
    headers = draw(st.permutations(headers))
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    return raw, no_transform


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=header_sets(), cookie=st.sampled_from([None, b"pm_vid=abc; Path=/; HttpOnly"]))
@example(case=([(b"cache-control", b"s-maxage=600, x-no-store")], False), cookie=None)
@example(case=([(b"vary", b"X-Cookie-Consent")], False), cookie=None)
def test_any_header_set_comes_out_uncacheable(
    case: tuple[list[tuple[bytes, bytes]], bool], cookie: bytes | None
) -> None:
    original, no_transform = case
    headers = decorated(list(original), set_cookie=cookie)
    seen = private_of(headers)
    # One Cache-Control line, with real "private" and "no-store" tokens and nothing that
    # lets any cache store or reuse the page.
    assert sum(k.lower() == b"cache-control" for k, _ in headers) == 1
    assert b"private" in seen["directives"] and b"no-store" in seen["directives"]
    expected = {b"private", b"no-store"} | ({b"no-transform"} if no_transform else set())
    assert set(seen["directives"]) == expected
    # Vary names Cookie (or *) as a real token, and loses none of the app's tokens.
    assert b"cookie" in seen["vary"] or b"*" in seen["vary"]
    before = [t for k, v in original if k.lower() == b"vary" for t in vary_tokens(v)]
    assert set(before) <= set(seen["vary"])
    assert sum(k.lower() == b"vary" for k, _ in headers) == 1
    # No CDN/surrogate header is left to override Cache-Control.
    assert seen["overrides"] == []
    # Every other header is untouched and in its order.
    assert [(k, v) for k, v in headers if not is_related(k.decode())] == [
        (k, v) for k, v in original if not is_related(k.decode())
    ]
    assert [v for k, v in headers if k == b"set-cookie"] == ([cookie] if cookie else [])


@settings(max_examples=300, deadline=None)
@given(directives=st.lists(DIRECTIVE, max_size=6), separators=st.lists(SEPARATORS, min_size=6))
def test_cache_directives_round_trip(
    directives: list[tuple[str, str | None]], separators: list[str]
) -> None:
    parts = [name if arg is None else f"{name}={arg}" for name, arg in directives]
    value = "".join((separators[i] if i else "") + part for i, part in enumerate(parts))

    def unquote(arg: str | None) -> bytes | None:
        if arg is None:
            return None
        if arg.startswith('"'):
            inner, out, i = arg[1:-1], "", 0
            while i < len(inner):
                if inner[i] == "\\":
                    i += 1
                out += inner[i]
                i += 1
            return out.encode()
        return arg.encode()

    assert cache_directives(value.encode()) == [
        (name.lower().encode(), unquote(arg)) for name, arg in directives
    ]


# -- end to end, through the middleware ------------------------------------------------------


async def keyed_page(request: Request) -> Response:
    """A route with configured keys, whose app asks for caching in every possible way."""
    await request.state.personalize.wait()
    return PlainTextResponse(
        "hi",
        headers={
            "Cache-Control": "s-maxage=600, x-no-store",
            "Vary": "X-Cookie-Consent",
            "CDN-Cache-Control": "max-age=600",
            "Surrogate-Control": "max-age=600",
        },
    )


async def lazy_stream(request: Request) -> Response:
    """No route keys; the experience is read inside the streamed body, after the headers."""
    handle = request.state.personalize

    async def body() -> AsyncIterator[bytes]:
        yield b"<html>"
        experience = await handle.get("home-hero")
        yield str(experience.get("title") if experience else "default").encode()

    return StreamingResponse(body(), headers=PUBLIC)


async def identity_only(request: Request) -> Response:
    identity = await request.state.personalize.resolve_identity()
    return PlainTextResponse(f"hello {identity.visitor_id}", headers=PUBLIC)


async def etag_page(request: Request) -> Response:
    """An ETag per visitor: a matching If-None-Match answers 304."""
    identity = await request.state.personalize.resolve_identity()
    etag = f'"{identity.visitor_id}"'
    headers = {"ETag": etag, **PUBLIC}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return PlainTextResponse("yours", headers=headers)


async def failing(request: Request) -> Response:
    raise HTTPException(500, "broken", headers=PUBLIC)


class OutOfStock(Exception):
    pass


async def raises_out_of_stock(request: Request) -> Response:
    raise OutOfStock


async def out_of_stock_page(request: Request, exc: Exception) -> Response:
    """An error page of the app's that shows an experience (it runs inside the
    middleware: handlers for the app's own exceptions do, unlike 500/Exception ones)."""
    hero = await request.state.personalize.get("home-hero")
    return PlainTextResponse(f"sold out, try {hero and hero.get('title')}", 503, headers=PUBLIC)


async def public_page(request: Request) -> Response:
    return PlainTextResponse("same for everyone", headers=PUBLIC)


async def public_stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"same "
        yield b"for everyone"

    return StreamingResponse(body(), headers=PUBLIC)


async def stream_fails_before_first_chunk(request: Request) -> Response:
    handle = request.state.personalize

    async def body() -> AsyncIterator[bytes]:
        await handle.get("home-hero")
        raise RuntimeError("template error")
        yield b""  # pragma: no cover

    return StreamingResponse(body(), headers=PUBLIC)


def make_app(**options: Any) -> Starlette:
    options.setdefault("backend", FakeBackend())
    options.setdefault("routes", {"/keyed": ["home-hero"], "/failing": ["home-hero"]})
    options.setdefault("secret_key", SECRET)
    options.setdefault("tracking", False)
    options.setdefault("metadata_refresh", None)
    options.setdefault("latency_budget", 30.0)
    return Starlette(
        routes=[
            Route("/keyed", keyed_page),
            Route("/lazy-stream", lazy_stream),
            Route("/static/stream", public_stream),
            Route("/identity", identity_only),
            Route("/etag", etag_page),
            Route("/failing", failing),
            Route("/public", public_page),
            Route("/public-stream", public_stream),
            Route("/fails", stream_fails_before_first_chunk),
            Route("/out-of-stock", raises_out_of_stock),
        ],
        exception_handlers={OutOfStock: out_of_stock_page},
        middleware=[Middleware(PersonalizeMiddleware, **options)],
    )


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def assert_private(response: httpx.Response) -> None:
    seen = private_of([(k.lower(), v) for k, v in response.headers.raw])
    assert {b"private", b"no-store"} <= set(seen["directives"]), response.headers
    assert {b"public", b"max-age", b"s-maxage"}.isdisjoint(seen["directives"])
    assert b"cookie" in seen["vary"] or b"*" in seen["vary"]
    assert seen["overrides"] == []


@pytest.mark.anyio
async def test_attack_headers_on_a_personalized_route_are_made_private() -> None:
    async with client_for(make_app()) as client:
        response = await client.get("/keyed")
    assert_private(response)
    assert response.headers["cache-control"] == "private, no-store"
    assert response.headers["vary"] == "X-Cookie-Consent, Cookie"
    assert "cdn-cache-control" not in response.headers
    assert "surrogate-control" not in response.headers


@pytest.mark.anyio
async def test_streamed_page_reading_experiences_lazily_is_private() -> None:
    async with client_for(make_app()) as client:
        response = await client.get("/lazy-stream")
        head = await client.head("/lazy-stream")
    assert response.text.startswith("<html>home-hero:")  # read after the headers left
    assert_private(response)
    assert_private(head)


@pytest.mark.anyio
async def test_identity_only_page_is_private_and_sets_the_visitor_cookie() -> None:
    async with client_for(make_app()) as client:
        first = await client.get("/identity")
        assert "pm_vid=" in first.headers["set-cookie"]
        assert_private(first)
        # A returning visitor (valid cookie, nothing to set) is private all the same.
        again = await client.get("/identity")
    assert "set-cookie" not in again.headers
    assert again.text == first.text
    assert_private(again)


@pytest.mark.anyio
async def test_304_head_and_error_pages_of_personal_routes_are_private() -> None:
    async with client_for(make_app()) as client:
        full = await client.get("/etag")
        not_modified = await client.get("/etag", headers={"If-None-Match": full.headers["etag"]})
        head = await client.head("/keyed")
        error = await client.get("/failing")
        error_page = await client.get("/out-of-stock")
    assert_private(full)
    assert not_modified.status_code == 304
    assert_private(not_modified)
    assert head.status_code == 200 and head.content == b""
    assert_private(head)
    assert error.status_code == 500
    assert_private(error)
    assert error_page.status_code == 503 and "home-hero:" in error_page.text
    assert_private(error_page)


@pytest.mark.anyio
async def test_pages_that_do_not_depend_on_the_visitor_keep_their_caching() -> None:
    async with client_for(make_app(exclude_paths=["/static/"])) as client:
        page = await client.get("/public")
        head = await client.head("/public")
        missing = await client.get("/nowhere")
        excluded_stream = await client.get("/static/stream")
    for response in (page, head, excluded_stream):
        assert response.headers["cache-control"] == "public, max-age=600"
        assert "vary" not in response.headers and "set-cookie" not in response.headers
    assert missing.status_code == 404 and "cache-control" not in missing.headers
    assert excluded_stream.text == "same for everyone"


@pytest.mark.anyio
async def test_a_streamed_body_through_the_middleware_is_private() -> None:
    # Its later chunks could read experiences after the headers left: private, unless
    # the path is in exclude_paths (above).
    async with client_for(make_app()) as client:
        response = await client.get("/public-stream")
    assert response.text == "same for everyone"
    assert_private(response)
    assert "set-cookie" not in response.headers


@pytest.mark.anyio
async def test_a_stream_made_private_against_the_apps_wish_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ResponseGate, "_told_streamed", False)
    caplog.set_level(logging.WARNING, logger="personalize_middleware")
    async with client_for(make_app()) as client:
        await client.get("/public-stream")
        await client.get("/public-stream")
    told = [r.getMessage() for r in caplog.records if "streamed response" in r.getMessage()]
    assert len(told) == 1 and "/public-stream" in told[0] and "exclude_paths" in told[0]


def test_a_failure_before_the_first_chunk_is_answered_by_the_error_handler() -> None:
    # The held start never left, so Starlette's error middleware can still answer 500
    # (before, the client got a 200 and a cut-off body).
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        response = client.get("/fails")
    assert response.status_code == 500
    assert response.headers.get("cache-control") != "public, max-age=600"


# -- the held start: raw ASGI apps -----------------------------------------------------------


def raw_middleware(app: Any) -> PersonalizeMiddleware:
    return PersonalizeMiddleware(
        app,
        backend=FakeBackend(),
        secret_key=SECRET,
        tracking=False,
        metadata_refresh=None,
        latency_budget=30.0,
    )


async def drive(app: Any, *, sent: list[Message] | None = None) -> list[Message]:
    path = "/page"
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"shop.test")],
        "client": ("203.0.113.7", 4321),
        "server": ("shop.test", 80),
        "extensions": {"http.response.trailers": {}, "http.response.pathsend": {}},
    }
    out: list[Message] = [] if sent is None else sent

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        out.append(message)

    middleware = raw_middleware(app)
    try:
        await middleware(scope, receive, send)
    finally:
        await middleware.shutdown()
    return out


def start(headers: list[tuple[bytes, bytes]] | None = None, **extra: Any) -> Message:
    return {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"cache-control", b"public, max-age=600"), *(headers or [])],
        **extra,
    }


def cache_control_of(message: Message) -> bytes:
    return dict(message["headers"])[b"cache-control"]


@pytest.mark.anyio
async def test_an_experience_read_after_the_start_message_still_makes_it_private() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start())
        await scope["state"]["personalize"].get("home-hero")  # after the start was "sent"
        await send({"type": "http.response.body", "body": b"hero"})

    sent = await drive(app)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert cache_control_of(sent[0]) == b"private, no-store"


@pytest.mark.anyio
async def test_other_messages_pass_through_in_order() -> None:
    async def trailers(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start(trailers=True))
        await send({"type": "http.response.body", "body": b"a", "more_body": False})
        await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})

    async def pathsend(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start())
        await send({"type": "http.response.pathsend", "path": "/dev/null"})

    async def zerocopy(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start())
        await send({"type": "http.response.zerocopy", "file": 0, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def no_body(scope: Scope, receive: Receive, send: Send) -> None:
        await send(start())  # and nothing else: the start is still sent, at the end

    sent = await drive(trailers)
    assert [m["type"] for m in sent] == [
        "http.response.start",
        "http.response.body",
        "http.response.trailers",
    ]
    assert sent[0]["trailers"] is True
    assert cache_control_of(sent[0]) == b"public, max-age=600"  # whole body, not personal
    sent = await drive(pathsend)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.pathsend"]
    assert cache_control_of(sent[0]) == b"public, max-age=600"
    sent = await drive(zerocopy)
    assert [m["type"] for m in sent] == [
        "http.response.start",
        "http.response.zerocopy",
        "http.response.body",
    ]
    assert cache_control_of(sent[0]) == b"private, no-store"  # streamed
    sent = await drive(no_body)
    assert [m["type"] for m in sent] == ["http.response.start"]


@pytest.mark.anyio
async def test_the_start_is_not_held_once_the_page_is_known_to_be_personal() -> None:
    sent: list[Message] = []
    seen_by_the_app: list[list[str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await scope["state"]["personalize"].get("home-hero")
        await send(start())
        seen_by_the_app.append([m["type"] for m in sent])  # already on its way
        await send({"type": "http.response.body", "body": b"hero"})

    await drive(app, sent=sent)
    assert seen_by_the_app == [["http.response.start"]]
    assert cache_control_of(sent[0]) == b"private, no-store"
