from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from personalize_middleware import (
    CircuitBreaker,
    ExperienceMetadata,
    Identity,
    Lifecycle,
    PersonalizeMiddleware,
    UpstreamUnavailableError,
)
from tests.support.fake_backend import FakeBackend, variation_for

SECRET = "test-secret-key-0123456789abcdef"


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-test-user")
    return Identity(customer_id=user) if user else None


async def page(request: Request) -> Response:
    handle = request.state.personalize
    await handle.wait()
    return JSONResponse({k: e.get("title") for k, e in handle.experiences.items()})


async def extra(request: Request) -> Response:
    handle = request.state.personalize
    found = await handle.get_many("x1", "x2", "home-hero")
    return JSONResponse(sorted(found))


async def plain(request: Request) -> Response:
    return PlainTextResponse("no personalization here")


async def strict(request: Request) -> Response:
    handle = request.state.personalize
    await handle.wait()
    return PlainTextResponse("ok", headers={"Cache-Control": "no-store, max-age=0"})


async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(
        "state" if "personalize" in websocket.scope.get("state", {}) else "none"
    )
    await websocket.close()


ROUTES = {"/": ["home-hero", "home-promo", "home-sidebar"], "/products/{id}": ["upsell"]}


def make_app(backend: FakeBackend, **options: Any) -> Starlette:
    options.setdefault("routes", ROUTES)
    options.setdefault("identify", header_identity)
    options.setdefault("secret_key", SECRET)
    options.setdefault("tracking", False)
    options.setdefault("metadata_refresh", None)
    # Tests about correctness, not about the budget, must not depend on the machine's
    # speed: a generous budget (the budget tests set their own).
    options.setdefault("latency_budget", 30.0)
    return Starlette(
        routes=[
            Route("/", page),
            Route("/products/{id}", page),
            Route("/extra", extra),
            Route("/plain", plain),
            Route("/strict", strict, methods=["GET"]),
            WebSocketRoute("/ws", ws),
        ],
        middleware=[Middleware(PersonalizeMiddleware, backend=backend, **options)],
    )


def make_middleware(backend: FakeBackend, **options: Any) -> PersonalizeMiddleware:
    app = make_app(backend, **options)
    middleware = app.user_middleware[0]
    return PersonalizeMiddleware(app.router, **middleware.kwargs)


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.mark.anyio
async def test_100_concurrent_cold_requests_of_one_user_make_one_upstream_call() -> None:
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    app = make_app(backend)
    async with client_for(app) as client:
        requests = [client.get("/", headers={"x-test-user": "alice"}) for _ in range(100)]
        tasks = [asyncio.ensure_future(r) for r in requests]
        # Let every request reach the store before the upstream answers.
        while len(backend.calls) < 1:
            await asyncio.sleep(0)
        for _ in range(50):
            await asyncio.sleep(0)
        backend.gate.set()
        responses = await asyncio.gather(*tasks)
    assert len(backend.calls) == 1
    assert backend.calls[0]["keys"] == ["home-hero", "home-promo", "home-sidebar"]
    for response in responses:
        assert response.status_code == 200
        assert response.json()["home-hero"] == variation_for("alice", "home-hero")


@pytest.mark.anyio
async def test_200_users_concurrently_each_get_their_own_variation() -> None:
    backend = FakeBackend()
    app = make_app(backend, max_concurrent_fetches=1000)
    async with client_for(app) as client:
        users = [f"user-{i}" for i in range(200)]
        responses = await asyncio.gather(
            *(client.get("/products/1", headers={"x-test-user": u}) for u in users)
        )
    mixups = [
        (user, r.json())
        for user, r in zip(users, responses, strict=True)
        if r.json() != {"upsell": variation_for(user, "upsell")}
    ]
    assert mixups == []
    assert len(backend.calls) == 200


@pytest.mark.anyio
async def test_three_keys_cost_one_call_on_a_miss_and_none_on_a_hit() -> None:
    backend = FakeBackend()
    app = make_app(backend)
    async with client_for(app) as client:
        first = await client.get("/", headers={"x-test-user": "bob"})
        second = await client.get("/", headers={"x-test-user": "bob"})
    assert first.json() == second.json()
    assert len(first.json()) == 3
    assert len(backend.calls) == 1


@pytest.mark.anyio
async def test_slow_upstream_renders_defaults_within_budget_and_fills_cache_late() -> None:
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    app = make_app(backend, latency_budget=0.1)
    async with client_for(app) as client:
        started = time.monotonic()
        response = await client.get("/", headers={"x-test-user": "carol"})
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert response.json() == {}  # defaults
        assert elapsed < 0.1 + 0.5
        backend.gate.set()  # the upstream answers late...
        await asyncio.wait_for(backend.answered.wait(), 5)
        for _ in range(5):
            await asyncio.sleep(0)
        again = await client.get("/", headers={"x-test-user": "carol"})
    assert again.json()["home-hero"] == variation_for("carol", "home-hero")
    assert len(backend.calls) == 1  # ...and the next request is a cache hit


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [UpstreamUnavailableError("connection refused"), RuntimeError("a bug in a backend")],
)
async def test_upstream_down_every_page_200_then_recovers(error: BaseException) -> None:
    backend = FakeBackend()
    backend.error = error
    breaker = CircuitBreaker(threshold=3, cooldown=0.05)
    app = make_app(backend, breaker=breaker)
    async with client_for(app) as client:
        for i in range(6):
            response = await client.get("/", headers={"x-test-user": f"d{i}"})
            assert response.status_code == 200
            assert response.json() == {}
        if isinstance(error, UpstreamUnavailableError):
            assert breaker.state == "open"
            assert len(backend.calls) == 3  # the breaker stopped calling
        backend.error = None
        deadline = time.monotonic() + 5
        while breaker.state == "open" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        recovered = await client.get("/", headers={"x-test-user": "after"})
    assert recovered.json()["home-hero"] == variation_for("after", "home-hero")


@pytest.mark.anyio
async def test_stale_content_is_served_when_the_upstream_fails() -> None:
    backend = FakeBackend()
    clock = [1000.0]
    middleware = make_middleware(
        backend, cache_ttl=10, stale_while_revalidate=1, stale_if_error=100
    )
    middleware.store.clock = lambda: clock[0]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="http://t"
    ) as client:
        fresh = await client.get("/", headers={"x-test-user": "erin"})
        clock[0] += 50  # past ttl + stale-while-revalidate, inside stale-if-error
        backend.error = UpstreamUnavailableError("down")
        stale = await client.get("/", headers={"x-test-user": "erin"})
    assert stale.status_code == 200
    assert stale.json() == fresh.json() != {}
    assert len(backend.calls) == 2


@pytest.mark.anyio
async def test_runtime_keys_fetch_only_the_missing_ones_in_one_call() -> None:
    backend = FakeBackend()
    app = make_app(backend, site_keys=["home-hero"])
    async with client_for(app) as client:
        response = await client.get("/extra", headers={"x-test-user": "fay"})
    assert response.json() == ["home-hero", "x1", "x2"]
    assert [c["keys"] for c in backend.calls] == [["home-hero"], ["x1", "x2"]]


def test_anonymous_visitor_gets_a_signed_httponly_cookie_and_a_sticky_identity() -> None:
    backend = FakeBackend()
    app = make_app(backend)
    with TestClient(app) as client:
        first = client.get("/")
        cookie = first.headers["set-cookie"]
        assert cookie.startswith("pm_vid=")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
        second = client.get("/")  # the client sends the cookie back
        assert "set-cookie" not in second.headers
    visitor_ids = {c["customer_id"] for c in backend.calls}
    assert len(visitor_ids) == 1 and None not in visitor_ids
    assert first.json() == second.json()


def test_visitor_cookie_is_secure_over_https() -> None:
    app = make_app(FakeBackend())
    with TestClient(app, base_url="https://shop.test") as client:
        assert "Secure" in client.get("/").headers["set-cookie"]


def test_forged_or_unsigned_visitor_ids_are_not_trusted() -> None:
    backend = FakeBackend()
    app = make_app(backend)
    with TestClient(app) as client:
        victim = client.get("/")
        victim_cookie = victim.cookies["pm_vid"]
        victim_id = victim_cookie.rsplit(".", 1)[0]
    forgeries = (victim_id, victim_id + ".AAAAAAAAAAAAAAAAAAAAAA", victim_id + ".", "x" * 5000)
    for forged in forgeries:
        with TestClient(app) as attacker:
            response = attacker.get(
                "/", headers={"cookie": f"pm_vid={forged}", "x-visitor-id": victim_id}
            )
        assert response.status_code == 200
        assert victim_id not in response.text
        issued = response.headers["set-cookie"].split(";")[0]
        assert issued != f"pm_vid={victim_cookie}" and victim_id not in issued
    assert sum(1 for c in backend.calls if c["customer_id"] == victim_id) == 1


def test_old_secret_keys_still_verify_and_the_cookie_is_resigned() -> None:
    backend = FakeBackend()
    old = make_app(backend, secret_key="old-secret-key-0123456789")
    with TestClient(old) as client:
        client.get("/")
        cookie = client.cookies["pm_vid"]
    rotated = make_app(
        backend, secret_key=["new-secret-key-0123456789", "old-secret-key-0123456789"]
    )
    with TestClient(rotated) as client:
        client.cookies.set("pm_vid", cookie)
        response = client.get("/")
        renewed = response.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    assert renewed.split(".")[0] == cookie.split(".")[0]  # same visitor, new signature
    assert renewed != cookie


def test_session_identity_and_invalidate_on_login() -> None:
    backend = FakeBackend()

    async def login(request: Request) -> Response:
        handle = request.state.personalize
        request.session["customer_id"] = "cust-42"
        await handle.invalidate(Identity(customer_id="cust-42"))
        return PlainTextResponse("in")

    async def home(request: Request) -> Response:
        handle = request.state.personalize
        await handle.wait()
        return JSONResponse({k: e.get("title") for k, e in handle.experiences.items()})

    app = Starlette(
        routes=[Route("/", home), Route("/login", login, methods=["POST"])],
        middleware=[
            Middleware(SessionMiddleware, secret_key="session-secret"),
            Middleware(
                PersonalizeMiddleware,
                backend=backend,
                routes={"/": ["hero"]},
                secret_key=SECRET,
                tracking=False,
                metadata_refresh=None,
            ),
        ],
    )
    with TestClient(app) as client:
        anonymous = client.get("/").json()["hero"]
        client.post("/login")
        customer = client.get("/").json()["hero"]
    assert anonymous != customer == variation_for("cust-42", "hero")


@pytest.mark.anyio
async def test_cache_key_includes_forwarded_attributes() -> None:
    backend = FakeBackend()
    app = make_app(backend)
    async with client_for(app) as client:
        await client.get("/", headers={"x-test-user": "gus"})
        await client.get("/?utm_medium=email", headers={"x-test-user": "gus"})
        await client.get("/?utm_medium=email", headers={"x-test-user": "gus"})
        await client.get("/", headers={"x-test-user": "gus", "user-agent": "Other/1.0"})
    assert len(backend.calls) == 3
    assert backend.calls[1]["attributes"]["utm_medium"] == "email"
    assert "utm_medium" not in backend.calls[0]["attributes"]


@pytest.mark.anyio
async def test_in_session_attributes_utc_and_trusted_proxies() -> None:
    backend = FakeBackend()
    app = make_app(backend, trusted_proxies=["127.0.0.0/8"])
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get(
            "/?utm_source=news&utm_campaign=x&other=1",
            headers={
                "x-test-user": "h",
                "x-forwarded-for": "203.0.113.9, 127.0.0.2",
                "user-agent": "UA/1",
            },
        )
    attrs = backend.calls[0]["attributes"]
    now = time.gmtime()
    assert attrs["TIME_OF_THE_DAY"] in {f"{now.tm_hour:02d}", f"{(now.tm_hour + 1) % 24:02d}"}
    assert attrs["DAY_OF_THE_WEEK"] in {
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    }
    assert attrs["USER_IP_ADDRESS"] == "203.0.113.9"
    assert attrs["USER_AGENT"] == "UA/1"
    assert attrs["utm_source"] == "news" and "other" not in attrs


@pytest.mark.anyio
async def test_forwarded_for_is_ignored_from_untrusted_peers() -> None:
    backend = FakeBackend()
    app = make_app(backend, send_day_of_week=False, send_time_of_day=False, send_user_agent=False)
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/", headers={"x-test-user": "i", "x-forwarded-for": "203.0.113.9"})
    assert backend.calls[0]["attributes"] == {"USER_IP_ADDRESS": "198.51.100.7"}


@pytest.mark.anyio
async def test_cache_headers_on_personalized_responses_only() -> None:
    app = make_app(FakeBackend())
    async with client_for(app) as client:
        personalized = await client.get("/", headers={"x-test-user": "j"})
        untouched = await client.get("/plain", headers={"x-test-user": "j"})
        stricter = await client.get("/strict", headers={"x-test-user": "j"})
    assert personalized.headers["cache-control"] == "private, no-store"
    assert personalized.headers["vary"] == "Cookie"
    assert "cache-control" not in untouched.headers
    assert stricter.headers["cache-control"] == "no-store, max-age=0"


def test_websocket_scopes_pass_through_and_lifespan_opens_and_closes_the_backend() -> None:
    backend = FakeBackend()
    from personalize_middleware._middleware import PersonalizeMiddleware as PM

    created: list[PM] = []

    class Recording(PM):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    app = Starlette(
        routes=[WebSocketRoute("/ws", ws), Route("/", page)],
        middleware=[
            Middleware(
                Recording,
                routes={"/": ["k"]},
                identify=header_identity,
                secret_key=SECRET,
                tracking=False,
                metadata_refresh=None,
                local_experiences=None,
                backend=backend,
            )
        ],
    )
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as socket:
            assert socket.receive_text() == "none"
        assert created[0].state is Lifecycle.RUNNING
    assert created[0].state is Lifecycle.CLOSED


@pytest.mark.anyio
async def test_metadata_skips_inactive_keys_and_suggests_typos(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = FakeBackend()
    backend.metadata = [
        ExperienceMetadata(key="home-hero", name="Hero", status="Active"),
        ExperienceMetadata(key="home-promo", name="Promo", status="Paused"),
        ExperienceMetadata(key="home-sidebar", name="Sidebar", status="Active"),
    ]
    middleware = make_middleware(
        backend, metadata_refresh=300, routes={"/": ["home-hero", "home-promo", "home-sidebr"]}
    )
    caplog.set_level(logging.INFO, "personalize_middleware")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="http://t"
    ) as client:
        await middleware.startup()
        assert middleware.metadata is not None
        await middleware.metadata.refresh()
        response = await client.get("/", headers={"x-test-user": "k"})
        await middleware.shutdown()
    assert backend.calls[0]["keys"] == ["home-hero"]
    assert list(response.json()) == ["home-hero"]
    assert "did you mean 'home-sidebar'?" in caplog.text


@pytest.mark.anyio
async def test_metadata_failure_does_not_block_requests() -> None:
    backend = FakeBackend()
    backend.metadata_error = UpstreamUnavailableError("down")
    app = make_app(backend, metadata_refresh=300)
    async with client_for(app) as client:
        response = await client.get("/", headers={"x-test-user": "l"})
    assert len(response.json()) == 3


def test_bad_configuration_names_the_field() -> None:
    from personalize_middleware import ConfigurationError

    cases = [
        ({"routes": {"no-slash": ["k"]}}, "routes"),
        ({"routes": {"/": "a-string"}}, "routes"),
        ({"routes": {"/": [""]}}, "routes"),
        ({"latency_budget": 0}, "latency_budget"),
        ({"trusted_proxies": ["not-an-ip"]}, "trusted_proxies"),
        ({"secret_key": "short"}, "secret_key"),
        ({"tracking_prefix": "nope"}, "tracking_prefix"),
    ]
    for options, field in cases:
        with pytest.raises(ConfigurationError) as info:
            PersonalizeMiddleware(
                Starlette(),
                backend=FakeBackend(),
                **{"secret_key": SECRET, "tracking": False, **options},
            )
        assert info.value.field is not None and info.value.field.startswith(field), options


def test_the_app_can_run_its_lifespan_twice_with_an_owned_http_client() -> None:
    """Regression: a second TestClient on the same app (a new event loop, a second
    lifespan) used to find the HTTP client closed by the first shutdown."""
    from personalize_middleware import LocalBackend, PersonalizeSettings, create_local_server
    from tests.support.http_server import run_asgi_server

    server = create_local_server(LocalBackend.default(), workspace_id="WS1", api_secret="s3cret")
    with run_asgi_server(server) as base_url:
        settings = PersonalizeSettings(
            workspace_id="WS1", api_secret="s3cret", base_url=base_url + "/v1"
        )
        app = Starlette(
            routes=[Route("/", page)],
            middleware=[
                Middleware(
                    PersonalizeMiddleware,
                    settings=settings,
                    routes={"/": ["hero-banner"]},
                    identify=header_identity,
                    secret_key=SECRET,
                )
            ],
        )
        seen = []
        for _ in range(2):
            with TestClient(app) as client:
                seen.append(client.get("/", headers={"x-test-user": "alice"}).json())
    assert seen[0] == seen[1] and "hero-banner" in seen[0]


def test_paths_that_only_share_the_prefix_are_the_apps() -> None:
    backend = FakeBackend()

    async def lookalike(request: Request) -> Response:
        return PlainTextResponse("app's own")

    app = Starlette(
        routes=[Route("/_personalizeX", lookalike)],
        middleware=[Middleware(PersonalizeMiddleware, backend=backend, secret_key=SECRET)],
    )
    with TestClient(app) as client:
        assert client.get("/_personalizeX").text == "app's own"
        assert client.get("/_personalize/nope").status_code == 404


@pytest.mark.anyio
async def test_identical_answers_are_shared_between_users_but_json_payloads_are_not() -> None:
    from personalize_middleware import Experience

    class SameForEveryone(FakeBackend):
        async def fetch_experiences(self, keys: Any, **kwargs: Any) -> dict[str, Experience]:
            self.calls.append({"keys": list(keys), **kwargs})
            context = {"cid": "c1", "experience": "e", "moe_variation_id": "1"}
            return {
                "plain": Experience.from_api(
                    "plain",
                    {
                        "payload": {"t": {"value": "x", "data_type": "string"}},
                        "experience_context": context,
                    },
                ),
                "json": Experience.from_api(
                    "json",
                    {
                        "payload": {"j": {"value": {"a": 1}, "data_type": "json"}},
                        "experience_context": context,
                    },
                ),
            }

    backend = SameForEveryone()
    middleware = make_middleware(backend, routes={"/": ["plain", "json"]})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="http://t"
    ) as client:
        for user in ("u1", "u2"):
            await client.get("/", headers={"x-test-user": user})
    store = middleware.store

    def cached(user: str, key: str) -> Any:
        [contexts] = [store._l1[f"c:{user}"]]
        [entries] = list(contexts.values())
        return entries[key].experience

    assert cached("u1", "plain") is cached("u2", "plain")
    assert cached("u1", "json") is not cached("u2", "json")
    assert cached("u1", "json") == cached("u2", "json")
    assert store.stats.interned == 1


@pytest.mark.anyio
async def test_fetches_beyond_the_cap_render_defaults_without_a_call() -> None:
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    app = make_app(backend, max_concurrent_fetches=2, latency_budget=5.0)
    async with client_for(app) as client:
        pending = [
            asyncio.ensure_future(client.get("/", headers={"x-test-user": u})) for u in ("a", "b")
        ]
        while len(backend.calls) < 2:
            await asyncio.sleep(0)
        shed = await client.get("/", headers={"x-test-user": "c"})  # answered at once
        assert shed.status_code == 200 and shed.json() == {}
        assert len(backend.calls) == 2
        backend.gate.set()
        served = await asyncio.gather(*pending)
        again = await client.get("/", headers={"x-test-user": "c"})  # capacity is back
    assert [len(r.json()) for r in served] == [3, 3]
    assert again.json()["home-hero"] == variation_for("c", "home-hero")


def test_a_malformed_cookie_of_another_site_does_not_hide_the_visitor_cookie() -> None:
    """Regression: SimpleCookie gave up on the whole header, so the visitor got a new id
    (and maybe another variation) on every page."""
    backend = FakeBackend()
    app = make_app(backend)
    with TestClient(app) as client:
        client.get("/")
        ours = client.cookies["pm_vid"]
    for header in (
        f'other="a b; pm_vid={ours}',
        f"broken cookie with spaces; pm_vid={ours}; x=[1,2]",
        f'pm_vid={ours}; quoted="va\\"lue"',
    ):
        with TestClient(app) as fresh:
            response = fresh.get("/", headers={"cookie": header})
        assert "set-cookie" not in response.headers, header
    assert len({c["customer_id"] for c in backend.calls}) == 1


def test_only_the_canonical_spelling_of_a_cookie_signature_verifies() -> None:
    """base64 ignores the low bits of the last character: 'A'..'D' decode alike."""
    from personalize_middleware._signing import Keyring

    keyring = Keyring([SECRET])
    signature = keyring.sign("visitor", b"someone")
    assert keyring.verify("visitor", b"someone", signature) == 0
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    variants = [signature[:-1] + c for c in alphabet if c != signature[-1]]
    assert all(keyring.verify("visitor", b"someone", v) is None for v in variants)
    assert keyring.verify("visitor", b"someone", signature + "=") is None
    assert keyring.verify("visitor", b"someone", "é" * 22) is None
