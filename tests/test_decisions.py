"""Why, on every experience: each key a request asks for ends in a ``Decision`` (source,
reason, age, fetch time) kept on the request's handle, never on the shared ``Experience``.

Failure reasons come from the real client against a real HTTP stand-in (500, 429, a
breaker opened by them); the shared source from a real Redis; templates read ``why``
through the middleware."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from personalize_middleware import (
    CircuitBreaker,
    Decision,
    ExperienceMetadata,
    ExperienceStore,
    Identity,
    LocalBackend,
    Personalization,
    PersonalizeClient,
    PersonalizeMiddleware,
    PersonalizeSettings,
    PersonalizeTemplates,
    RedisSharedLayer,
)
from tests.conftest import require_tool
from tests.support.fake_backend import FakeBackend
from tests.support.faulty_upstream import Fault, FaultyUpstream
from tests.support.redis_support import (
    REDIS_URL,
    delete_workspace,
    new_workspace,
    redis_available,
)
from tests.support.tracking_helpers import StaticBackend

EXAMPLE_FILE = Path(__file__).resolve().parents[1] / "example_app" / "experiences.yaml"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def why(handle: Personalization, key: str) -> Decision:
    found = handle.why(key)
    assert found is not None, key
    return found


async def ask(
    store: ExperienceStore,
    keys: tuple[str, ...],
    who: str = "alice",
    *,
    budget: float = 10.0,
    **options: Any,
) -> Personalization:
    """One request's handle, after waiting for its keys (at most ``budget``)."""

    async def identify() -> Identity:
        return Identity(customer_id=who)

    handle = Personalization(
        store=store,
        keys=keys,
        attributes={"utm_medium": "email"},
        budget=budget,
        identity_factory=identify,
        **options,
    )
    await handle.start()
    await handle.wait()
    return handle


@pytest.mark.anyio
async def test_network_then_cache_with_its_age_then_stale_while_revalidating() -> None:
    clock = Clock()
    store = ExperienceStore(FakeBackend(), ttl=60, stale_while_revalidate=300, clock=clock)
    first = await ask(store, ("hero",))
    decision = why(first, "hero")
    assert decision.source == "network" and decision.reason is None
    assert decision.fetch_ms is not None and decision.fetch_ms >= 0

    clock.now += 12
    second = await ask(store, ("hero",))
    assert second.why("hero") == Decision("cache", None, 12.0, None)
    assert str(second.why("hero")) == "cache (12 s old)"

    clock.now += 60  # 72 s: past the ttl, inside stale-while-revalidate
    third = await ask(store, ("hero",))
    assert third.why("hero") == Decision("stale", "revalidating", 72.0, None)
    assert third.experience("hero") is not None
    assert first.why("hero") == decision  # one request's story does not change with the next
    await store.aclose()


@pytest.mark.anyio
async def test_no_match_is_a_default_from_the_network_then_from_the_cache() -> None:
    clock = Clock()
    store = ExperienceStore(FakeBackend(known_keys={"hero"}), clock=clock)
    first = await ask(store, ("hero", "other"))
    other = first.why("other")
    assert other is not None and (other.source, other.reason) == ("default", "no_match")
    assert other.is_default and other.fetch_ms is not None
    clock.now += 5
    second = await ask(store, ("hero", "other"))
    assert second.why("other") == Decision("default", "no_match", 5.0, None)
    assert second.why("never-asked") is None
    assert list(second.decisions) == ["hero", "other"]
    await store.aclose()


@pytest.mark.anyio
async def test_interned_experience_is_shared_but_each_request_keeps_its_own_why() -> None:
    """The store hands two users the same Experience object; their stories differ."""
    clock = Clock()
    store = ExperienceStore(StaticBackend({"hero": {"Title": "Sale"}}), clock=clock)
    alice_first = await ask(store, ("hero",), "alice")
    clock.now += 30
    bob_first = await ask(store, ("hero",), "bob")
    clock.now += 10
    alice = await ask(store, ("hero",), "alice")
    bob = await ask(store, ("hero",), "bob")
    assert bob.experience("hero") is alice.experience("hero")  # interned: one object
    assert alice.why("hero") == Decision("cache", None, 40.0, None)
    assert bob.why("hero") == Decision("cache", None, 10.0, None)
    assert why(alice_first, "hero").source == "network"
    assert why(bob_first, "hero").source == "network"
    experience = bob.experience("hero")
    assert experience is not None and not hasattr(experience, "why")
    await store.aclose()


@pytest.mark.anyio
async def test_the_local_engine_is_the_source_in_local_mode() -> None:
    store = ExperienceStore(LocalBackend(EXAMPLE_FILE))
    handle = await ask(store, ("home-hero",))
    assert why(handle, "home-hero").source == "local"
    assert handle.experience("home-hero") is not None
    await store.aclose()


@pytest.mark.anyio
async def test_budget_expiry_is_a_timeout_default_or_stale_content_with_its_age() -> None:
    clock = Clock()
    backend = FakeBackend()
    store = ExperienceStore(backend, ttl=60, stale_while_revalidate=0, clock=clock)
    await ask(store, ("hero",), "alice")
    clock.now += 100  # stale, within stale-if-error
    backend.gate = asyncio.Event()  # the upstream hangs from now on
    alice = await ask(store, ("hero", "new-key"), "alice", budget=0.05)
    assert alice.why("hero") == Decision("stale", "timeout", 100.0, None)
    assert alice.why("new-key") == Decision("default", "timeout")
    assert alice.sources == "stale:timeout+default:timeout"  # the Server-Timing description
    bob = await ask(store, ("hero",), "bob", budget=0.05)
    assert bob.why("hero") == Decision("default", "timeout")
    assert bob.experience("hero") is None
    backend.gate.set()
    await store.aclose()


@pytest.mark.anyio
async def test_a_key_still_in_flight_within_the_budget_is_pending() -> None:
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    store = ExperienceStore(backend)

    async def identify() -> Identity:
        return Identity(customer_id="p")

    handle = Personalization(
        store=store, keys=("hero",), attributes={}, budget=30.0, identity_factory=identify
    )
    await handle.start()
    assert handle.why("hero") == Decision("pending")
    backend.gate.set()
    await handle.wait()
    assert why(handle, "hero").source == "network"
    await store.aclose()


@pytest.mark.anyio
async def test_shed_when_too_many_fetches_are_in_flight() -> None:
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    store = ExperienceStore(backend, max_concurrent_fetches=1)
    first = asyncio.ensure_future(ask(store, ("hero",), "alice"))
    while not backend.calls:
        await asyncio.sleep(0)
    shed = await ask(store, ("hero",), "bob")
    assert shed.why("hero") == Decision("default", "shed")
    backend.gate.set()
    assert why(await first, "hero").source == "network"
    await store.aclose()


@pytest.mark.anyio
async def test_metadata_filter_says_not_active_or_unknown_key() -> None:
    store = ExperienceStore(FakeBackend())
    statuses = {"hero": "Active", "paused": "Paused"}
    handle = await ask(
        store,
        ("hero", "paused", "typo"),
        active_keys=lambda keys: tuple(k for k in keys if statuses.get(k) == "Active"),
        key_status=statuses.get,
    )
    assert handle.why("paused") == Decision("default", "not_active")
    assert handle.why("typo") == Decision("default", "unknown_key")
    assert why(handle, "hero").source == "network"
    await store.aclose()


# -- failures through the real client and a real HTTP stand-in --------------------------------


@pytest.fixture
def upstream() -> Iterator[FaultyUpstream]:
    upstream = FaultyUpstream(workspace_id="WSDECIDE01", api_secret="decide-secret-0123")
    with upstream.serve():
        yield upstream
    assert upstream.violations == []


def client_store(upstream: FaultyUpstream, clock: Clock, **options: Any) -> ExperienceStore:
    settings = PersonalizeSettings(
        workspace_id=upstream.workspace_id,
        api_secret=upstream.api_secret,
        base_url=upstream.base_url,
    )
    return ExperienceStore(PersonalizeClient(settings), clock=clock, **options)


@pytest.mark.anyio
async def test_upstream_failures_name_their_reason(upstream: FaultyUpstream) -> None:
    clock = Clock()
    store = client_store(
        upstream, clock, ttl=60, stale_while_revalidate=0, breaker=CircuitBreaker(threshold=2)
    )
    async with store.backend:
        await ask(store, ("hero",), "alice")  # cached for alice
        clock.now += 100
        upstream.set_fault(Fault.ERROR_500, "fetch")
        alice = await ask(store, ("hero",), "alice")
        assert alice.why("hero") == Decision(
            "stale", "upstream_error", 100.0, why(alice, "hero").fetch_ms
        )
        assert alice.experience("hero") is not None
        upstream.set_fault(Fault.RATE_LIMITED, "fetch")
        bob = await ask(store, ("hero",), "bob")
        assert (why(bob, "hero").source, why(bob, "hero").reason) == ("default", "rate_limited")
        calls = upstream.calls("fetch")
        carol = await ask(store, ("hero",), "carol")  # two failures: the breaker is open
        assert why(carol, "hero").reason == "breaker_open"
        assert upstream.calls("fetch") == calls  # no call was made
    await store.aclose()


# -- the shared cache (a real Redis) ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.redis
async def test_an_answer_from_the_shared_cache_says_shared(upstream: FaultyUpstream) -> None:
    require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
    workspace = new_workspace()
    clock = Clock()
    # Two "processes": each its own store (L1) and Redis pool, one workspace namespace.
    a = client_store(upstream, clock, shared=RedisSharedLayer(REDIS_URL, workspace_id=workspace))
    b = client_store(upstream, clock, shared=RedisSharedLayer(REDIS_URL, workspace_id=workspace))
    try:
        for store in (a, b):
            await store.backend.__aenter__()
            await store.start()
        first = await ask(a, ("hero",), "dana")
        second = await ask(b, ("hero",), "dana")
        assert why(first, "hero").source == "network"
        shared = why(second, "hero")
        assert shared == Decision("shared", None, 0.0, shared.fetch_ms)
        assert upstream.calls("fetch") == 1
    finally:
        for store in (a, b):
            await store.aclose()
            await store.backend.aclose()
        delete_workspace(workspace)


# -- templates and handlers -------------------------------------------------------------------

PAGE = """\
{% experience "hero" as hero %}
  hero={{ hero.title }} why={{ hero.why.source }}/{{ hero.why.reason }}
{% else %}hero=default{% endexperience %}
{% experience "paused" as paused %}paused=shown
{% else %}paused={{ personalize.why("paused").reason }}{% endexperience %}
{% experience "gone" as gone %}gone=shown
{% else %}gone={{ personalize.why("gone") }}{% endexperience %}
"""


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


@pytest.mark.anyio
async def test_templates_and_handlers_read_why() -> None:
    backend = FakeBackend(known_keys={"hero"})
    templates = PersonalizeTemplates(
        env=jinja2.Environment(loader=jinja2.DictLoader({"page.html": PAGE}), autoescape=True)
    )

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html")

    async def api(request: Request) -> Response:
        handle: Personalization = request.state.personalize
        await handle.wait()
        return JSONResponse({k: d.as_dict() for k, d in handle.decisions.items()})

    middleware = PersonalizeMiddleware(
        Starlette(routes=[Route("/", page), Route("/api", api)]),
        backend=backend,
        routes={"/": ["hero", "paused", "gone"], "/api": ["hero", "gone"]},
        identify=header_identity,
        secret_key="decisions-secret-0123456789",
        tracking=False,
        metadata_refresh=300,
    )
    backend.metadata = [
        ExperienceMetadata(key="hero", name="Hero", status="Active"),
        ExperienceMetadata(key="paused", name="Paused", status="Paused"),
        ExperienceMetadata(key="gone", name="Gone", status="Active"),
    ]
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await middleware.startup()
        assert middleware.metadata is not None
        await middleware.metadata.refresh()
        first = (await client.get("/", headers={"x-user": "ann"})).text
        second = (await client.get("/", headers={"x-user": "ann"})).text
        api_answer = (await client.get("/api", headers={"x-user": "ann"})).json()
        await middleware.shutdown()
    assert "hero=hero:ann why=network/None" in first
    assert "hero=hero:ann why=cache/None" in second
    assert "paused=not_active" in first
    assert "gone=default: no_match" in first  # str(Decision)
    assert api_answer["hero"]["source"] == "cache"
    assert api_answer["gone"]["source"] == "default" and api_answer["gone"]["reason"] == "no_match"
