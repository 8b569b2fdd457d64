"""The cache-hit fast path (``_visit``, ``Personalization.begin``): the same answers as
the slow path, never another visitor's, and no per-request garbage cycle."""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any

import jinja2
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from personalize_middleware import Keyring, PersonalizeMiddleware, PersonalizeTemplates
from personalize_middleware._context import SessionAttributes
from personalize_middleware._identity import VisitorCookie
from personalize_middleware._visit import MAX_KEY_BYTES, VisitMemo
from personalize_middleware.tracking import TrackingLimits
from tests.support.fake_backend import FakeBackend
from tests.support.tracking_helpers import BROWSER_USER_AGENT

pytestmark = pytest.mark.anyio

SECRET = "test-secret-key-0123456789abcdef"
KEYS = ["home-hero", "home-promo"]
OTHER_AGENT = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) Gecko/20100101 Firefox/133.0"

PAGE = """<html><body>
{% experience "home-hero" as hero %}
  <section{{ impression(hero) }}><h1>{{ hero.string("title", "Welcome") }}</h1>
  <a href="/x"{{ track_click(hero, "cta") }}>{{ hero.string("title") }}</a></section>
{% else %}<h1>Welcome</h1>{% endexperience %}
{% experience "home-promo" as promo %}<p{{ impression(promo) }}>{{ promo.get("title") }}</p>
{% endexperience %}
{{ personalize_script() }}
</body></html>"""

TEMPLATES = PersonalizeTemplates(env=jinja2.Environment(loader=jinja2.DictLoader({"p": PAGE})))


class AuthFromHeader:
    """Sets ``scope["user"]`` from ``x-user`` (what AuthenticationMiddleware does): the
    Cookie header, and so the visit memo's key, stays the same."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope.get("headers", ()):
            if name == b"x-user":
                scope["user"] = _User(value.decode())
        await self.app(scope, receive, send)


class _User:
    is_authenticated = True

    def __init__(self, name: str) -> None:
        self.identity = name


async def titles(request: Request) -> Response:
    handle = request.state.personalize
    await handle.wait()
    return JSONResponse(
        {
            "titles": {k: e.get("title") for k, e in handle.experiences.items()},
            "identity": handle.identity.cache_key if handle.identity else None,
        }
    )


async def page(request: Request) -> Response:
    return TEMPLATES.TemplateResponse(request, "p", {})


KEPT: list[Any] = []


async def keep(request: Request) -> Response:
    KEPT.append(request.state.personalize)  # read after the request: no keys on this route
    return JSONResponse({})


def make_app(backend: FakeBackend, *, auth_first: bool = False, **options: Any) -> Starlette:
    options.setdefault("routes", {"/": KEYS, "/page": KEYS})
    options.setdefault("secret_key", SECRET)
    options.setdefault("metadata_refresh", None)
    options.setdefault("latency_budget", 30.0)
    options.setdefault("client_limits", None)
    options.setdefault("tracking", False)
    return Starlette(
        routes=[Route("/", titles), Route("/page", page), Route("/keep", keep)],
        # AuthFromHeader wraps the middleware (as the docs say to add it), or not: then
        # the x-user header changes nothing the middleware sees.
        middleware=[
            *([Middleware(AuthFromHeader)] if auth_first else []),
            Middleware(PersonalizeMiddleware, backend=backend, **options),
        ],
    )


async def call(
    app: ASGIApp, path: str = "/", headers: Iterable[tuple[str, str]] = (), query: str = ""
) -> tuple[int, dict[str, list[str]], bytes]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        + [(b"host", b"testserver")],
        "client": ("203.0.113.9", 50000),
        "server": ("testserver", 80),
    }
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = messages[0]
    found: dict[str, list[str]] = {}
    for name, value in start["headers"]:
        found.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
    body = b"".join(m.get("body", b"") for m in messages[1:])
    return start["status"], found, body


class Lifespan:
    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __aenter__(self) -> Starlette:
        self.middleware = _find(self.app)
        await self.middleware.startup()
        return self.app

    async def __aexit__(self, *exc: object) -> None:
        await self.middleware.shutdown()


def _find(app: Starlette) -> PersonalizeMiddleware:
    app.middleware_stack = app.build_middleware_stack()
    node: Any = app.middleware_stack
    while not isinstance(node, PersonalizeMiddleware):
        node = node.app
    return node


async def visitor_cookie(app: Starlette) -> str:
    """A new visitor's signed cookie, as the middleware issues it."""
    _, headers, _ = await call(app, headers=[("user-agent", BROWSER_USER_AGENT)])
    return headers["set-cookie"][0].split(";")[0]


async def test_returning_visitors_each_get_their_own_answers() -> None:
    backend = FakeBackend()
    async with Lifespan(make_app(backend)) as app:
        first, second = await visitor_cookie(app), await visitor_cookie(app)
        assert first != second
        seen: dict[str, set[bytes]] = {first: set(), second: set()}
        for _ in range(5):
            for cookie in (first, second):
                status, headers, body = await call(
                    app, headers=[("cookie", cookie), ("user-agent", BROWSER_USER_AGENT)]
                )
                assert status == 200
                assert "set-cookie" not in headers  # a valid cookie is not issued again
                assert headers["cache-control"] == ["private, no-store"]
                seen[cookie].add(body)
        assert len(seen[first]) == len(seen[second]) == 1  # each sees the same, always
        assert seen[first] != seen[second]  # and not the other's
        for cookie, bodies in seen.items():
            visitor = cookie.split("=", 1)[1].rpartition(".")[0]
            assert f"v:{visitor}".encode() in next(iter(bodies))
            assert f"home-hero:{visitor}".encode() in next(iter(bodies))


async def test_a_forged_cookie_is_never_remembered_as_a_visitor() -> None:
    backend = FakeBackend()
    async with Lifespan(make_app(backend)) as app:
        real = await visitor_cookie(app)
        name, value = real.split("=", 1)
        visitor_id = value.rpartition(".")[0]
        forged = f"{name}={visitor_id}.{'A' * 22}"  # the victim's id, a made-up signature
        issued = set()
        for _ in range(3):
            _, headers, body = await call(
                app, headers=[("cookie", forged), ("user-agent", BROWSER_USER_AGENT)]
            )
            assert visitor_id.encode() not in body  # never the victim's answers
            issued.add(headers["set-cookie"][0])  # a fresh visitor every time
        assert len(issued) == 3


async def test_the_user_wins_over_a_remembered_visitor_with_the_same_headers() -> None:
    backend = FakeBackend()
    async with Lifespan(make_app(backend, auth_first=True)) as app:
        cookie = await visitor_cookie(app)
        browser = [("cookie", cookie), ("user-agent", BROWSER_USER_AGENT)]
        _, _, anonymous = await call(app, headers=browser)  # remembered now
        _, _, customer = await call(app, headers=[*browser, ("x-user", "cust-42")])
        _, _, again = await call(app, headers=browser)
        assert b"c:cust-42" in customer and b"home-hero:cust-42" in customer
        assert b"c:cust-42" not in anonymous + again
        assert anonymous == again


async def test_attributes_follow_the_user_agent_and_the_query() -> None:
    backend = FakeBackend()
    async with Lifespan(make_app(backend)) as app:
        cookie = await visitor_cookie(app)
        backend.calls.clear()
        for agent, query in (
            (BROWSER_USER_AGENT, ""),
            (OTHER_AGENT, ""),
            (BROWSER_USER_AGENT, "utm_source=news"),
            (BROWSER_USER_AGENT, ""),  # the first again: a cache hit, no call
        ):
            await call(app, headers=[("cookie", cookie), ("user-agent", agent)], query=query)
        sent = [
            (c["attributes"]["USER_AGENT"], c["attributes"].get("utm_source"))
            for c in backend.calls
        ]
        # The browser's first page (the cookie's issue) fetched and cached its answers.
        assert sent == [
            (OTHER_AGENT, None),
            (BROWSER_USER_AGENT, "news"),
        ]


def _memo(clock: list[float], maxsize: int = 4) -> tuple[VisitMemo, VisitorCookie]:
    keyring = Keyring.from_config(SECRET)
    cookie = VisitorCookie(keyring)
    attributes = SessionAttributes(clock=lambda: clock[0])
    return (
        VisitMemo(
            attributes, cookie, crawler_defaults=False, needs_user_agent=False, maxsize=maxsize
        ),
        cookie,
    )


def _scope(cookie: str | None = None, agent: str = BROWSER_USER_AGENT) -> dict[str, Any]:
    headers = [(b"user-agent", agent.encode())]
    if cookie is not None:
        headers.append((b"cookie", cookie.encode()))
    return {"type": "http", "headers": headers, "client": ("203.0.113.9", 1), "query_string": b""}


def test_the_memo_follows_the_hour() -> None:
    clock = [1_700_000_000.0]  # a Tuesday, 22:13 UTC
    memo, _ = _memo(clock)
    first = memo.visit(_scope())
    assert memo.visit(_scope()) is first
    assert first.attributes["TIME_OF_THE_DAY"] == "22"
    clock[0] += 3600
    later = memo.visit(_scope())
    assert later is not first
    assert (later.attributes["DAY_OF_THE_WEEK"], later.attributes["TIME_OF_THE_DAY"]) == (
        "Tuesday",
        "23",
    )


def test_the_memo_is_bounded_and_read_only() -> None:
    clock = [1_700_000_000.0]
    memo, cookie = _memo(clock, maxsize=4)
    header = cookie.set_cookie_header("A" * 22, secure=False).decode().split(";")[0]
    visit = memo.visit(_scope(header))
    assert visit.visitor_id == "A" * 22 and visit.query is not None
    with pytest.raises(TypeError):
        visit.attributes["USER_AGENT"] = "x"  # type: ignore[index]
    for i in range(40):
        memo.visit(_scope(agent=f"agent {i}"))
        assert len(memo) <= 8
    huge = _scope(header + "; other=" + "x" * MAX_KEY_BYTES)
    assert memo.visit(huge) is not memo.visit(huge)  # built each time, never remembered
    assert memo.visit(huge).visitor_id == "A" * 22
    twice = _scope(header)
    twice["headers"].append((b"cookie", b"pm_vid=someone-else"))
    assert memo.visit(twice) is not memo.visit(twice)  # repeated headers: not remembered


async def test_a_handle_kept_after_its_request_still_resolves_its_identity() -> None:
    backend = FakeBackend()
    async with Lifespan(make_app(backend)) as app:
        KEPT.clear()
        await call(app, "/keep", headers=[("user-agent", BROWSER_USER_AGENT)])
        (handle,) = KEPT
        assert handle.identity is None  # the route has no keys and the page did not ask
        identity = await handle.resolve_identity()
        assert identity.visitor_id is not None
        KEPT.clear()


@pytest.mark.parametrize("identity", ["visitor", "customer"])
def test_no_garbage_cycle_per_request(identity: str) -> None:
    """A full page (tag, reads, hooks, script) leaves nothing for the cyclic GC: with 100k
    users cached, per-request cycles cost 35-44 µs a request in collections."""
    import asyncio

    backend = FakeBackend()
    app = make_app(backend, tracking=True, auth_first=identity == "customer")

    async def headers() -> list[tuple[str, str]]:
        async with Lifespan(app):
            cookie = await visitor_cookie(app)
        found = [("cookie", cookie), ("user-agent", BROWSER_USER_AGENT)]
        return [*found, ("x-user", "cust-1")] if identity == "customer" else found

    browser = asyncio.run(headers())

    async def measure() -> tuple[int, int]:
        async with Lifespan(app):
            _find(app).tracking.limits = TrackingLimits.off()  # type: ignore[union-attr]
            for _ in range(3):
                await call(app, "/page", headers=browser)
            counts = []
            for requests in (20, 60):
                gc.collect()
                gc.disable()
                try:
                    for _ in range(requests):
                        status, _, body = await call(app, "/page", headers=browser)
                        assert status == 200 and b"data-pz-click" in body
                    counts.append(gc.collect())
                finally:
                    gc.enable()
        return counts[0], counts[1]

    few, many = asyncio.run(measure())
    assert many == few == 0, f"unreachable objects: {few} after 20 requests, {many} after 60"


def test_the_active_key_filter_is_memoised_until_the_statuses_change() -> None:
    from personalize_middleware.upstream._metadata import MetadataWatcher

    watcher = MetadataWatcher(FakeBackend(), ("a", "b", "c"))
    assert watcher.active(("a", "b")) == ("a", "b")  # unknown yet: everything
    watcher.statuses = {"a": "Active", "b": "Paused", "c": "Active"}
    first = watcher.active(("a", "b", "c"))
    assert first == ("a", "c") and watcher.active(("a", "b", "c")) is first
    watcher.statuses = {"a": "Paused", "b": "Active", "c": "Active"}  # a refresh
    assert watcher.active(("a", "b", "c")) == ("b", "c")
    for i in range(3000):  # any keys a page asks for with get_many(): bounded
        watcher.active((f"k{i}",))
    assert len(watcher._memo) <= 1024
