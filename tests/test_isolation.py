"""Cross-user isolation under concurrency: thousands of page views from hundreds of users,
shuffled and in flight at once, and not one page shows another user's content.

Users are logged-in customers (``customer_id``), users known by e-mail only
(``user_identifiers``), and anonymous visitors with their own signed cookie; each
request may carry a ``utm_medium`` (an in-session attribute: part of the answer, so part
of the cache key). Every answer names the user and the medium it was made for.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from personalize_middleware import (
    Experience,
    Identity,
    PersonalizeMiddleware,
    PersonalizeSettings,
)
from tests.support.fake_backend import FakeBackend
from tests.support.faulty_upstream import FaultyUpstream, title_for

pytestmark = pytest.mark.anyio

WORKSPACE = "WS_ISOLATION"
SECRET = "isolation-api-secret-4242"
SIGNING_KEY = "isolation-signing-key-0123456789"
KEYS = ("hero", "promo", "sidebar")
MEDIUMS = (None, "email", "social")
REQUESTS_PER_USER = 10


def identify(conn: HTTPConnection) -> Identity | None:
    if user := conn.headers.get("x-user"):
        return Identity(customer_id=user)
    if email := conn.headers.get("x-email"):
        return Identity(user_identifiers={"u_em": email})
    return None  # anonymous: the signed visitor cookie


async def page(request: Request) -> Response:
    handle = request.state.personalize
    await handle.wait()
    return JSONResponse(
        {
            "titles": {k: handle.value(k, "title", "default") for k in KEYS},
            "medium": handle.value("hero", "medium"),
        }
    )


@dataclass
class User:
    """One browser: how it identifies itself, and whom the answers must name."""

    kind: str  # "customer" | "email" | "anonymous"
    name: str
    cookie: str | None = None  # anonymous: "pm_vid=<id>.<signature>"

    @property
    def who(self) -> str:
        """The id the upstream sees (and puts in every title)."""
        if self.kind == "anonymous":
            assert self.cookie is not None
            return self.cookie.split("=", 1)[1].rsplit(".", 1)[0]
        return self.name

    def headers(self) -> dict[str, str]:
        if self.kind == "customer":
            return {"x-user": self.name}
        if self.kind == "email":
            return {"x-email": self.name}
        return {"cookie": self.cookie} if self.cookie else {}


def population(scale: int = 1) -> list[User]:
    """``60 * scale`` customers, ``20 * scale`` e-mail users, ``40 * scale`` visitors."""
    return (
        [User("customer", f"customer-{i}") for i in range(60 * scale)]
        + [User("email", f"user{i}@example.com") for i in range(20 * scale)]
        + [User("anonymous", f"visitor-{i}") for i in range(40 * scale)]
    )


async def first_visits(client: httpx.AsyncClient, users: list[User]) -> list[httpx.Response]:
    """Anonymous visitors get their cookie on a first visit (concurrent too)."""
    anonymous = [u for u in users if u.kind == "anonymous"]
    responses = await asyncio.gather(*(client.get("/") for _ in anonymous))
    for user, response in zip(anonymous, responses, strict=True):
        user.cookie = response.headers["set-cookie"].split(";", 1)[0]
    assert len({u.cookie for u in anonymous}) == len(anonymous)  # nobody shares an id
    return list(responses)


def visits(users: list[User], rng: random.Random) -> list[tuple[User, str | None]]:
    """Every user's remaining page views, each with a random medium, shuffled."""
    plan = [
        (user, rng.choice(MEDIUMS))
        for user in users
        for _ in range(REQUESTS_PER_USER - (user.kind == "anonymous"))
    ]
    rng.shuffle(plan)
    return plan


async def view(
    client: httpx.AsyncClient,
    user: User,
    medium: str | None,
    limit: asyncio.Semaphore | None = None,
) -> tuple[User, str | None, httpx.Response]:
    params = {"utm_medium": medium} if medium else {}
    async with limit or contextlib.nullcontext():
        return user, medium, await client.get("/", params=params, headers=user.headers())


def mixups(
    results: list[tuple[User, str | None, httpx.Response]], *, echoes_medium: bool
) -> list[Any]:
    wrong: list[tuple[Any, ...]] = []
    for user, medium, response in results:
        expected: dict[str, Any] = {"titles": {k: title_for(user.who, k) for k in KEYS}}
        if echoes_medium:
            expected["medium"] = medium or ""
        got = response.json()
        if not echoes_medium:
            got.pop("medium", None)
        if response.status_code != 200 or got != expected:
            wrong.append((user.kind, user.name, medium, response.status_code, got))
        if user.kind == "anonymous" and response.headers.get_list("set-cookie"):
            wrong.append((user.kind, user.name, medium, "issued another cookie", None))
    return wrong


def middleware(**options: Any) -> PersonalizeMiddleware:
    return PersonalizeMiddleware(
        Starlette(routes=[Route("/", page)]),
        routes={"/": list(KEYS)},
        identify=identify,
        secret_key=SIGNING_KEY,
        tracking=False,
        metadata_refresh=None,
        send_day_of_week=False,  # no hour boundary may change the context mid-test
        send_time_of_day=False,
        latency_budget=30.0,  # every page waits for its answer: a default proves nothing
        max_concurrent_fetches=10_000,  # ... and none is shed: no default without a call
        # ... nor held back by the per-client limits: hundreds of users share one address
        # here, and a tiny cache makes each one fetch often (test_fair_budget covers them).
        client_limits=None,
        **options,
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    stand_in = FaultyUpstream(
        workspace_id=WORKSPACE, api_secret=SECRET, ok_delay=(0.0, 0.02), known_keys=KEYS
    )
    with stand_in.serve():
        yield stand_in
    assert stand_in.violations == []


async def test_120_users_10_requests_each_over_real_http_zero_mixups(
    upstream: FaultyUpstream,
) -> None:
    app = middleware(
        settings=PersonalizeSettings(
            workspace_id=WORKSPACE,
            api_secret=SECRET,
            base_url=upstream.base_url,
            connect_timeout=10,
            read_timeout=10,
        )
    )
    users = population(scale=1)
    rng = random.Random(7)
    transport = httpx.ASGITransport(app=app, client=("198.51.100.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
        firsts = await first_visits(client, users)
        plan = visits(users, rng)
        # 150 pages in flight at a time: enough to interleave every user's fetches, while
        # httpcore's pool (whose bookkeeping grows with the square of the requests waiting
        # for a connection) stays out of what this test measures.
        limit = asyncio.Semaphore(150)
        results = await asyncio.gather(
            *(view(client, user, medium, limit) for user, medium in plan)
        )
    await app.shutdown()

    assert len(results) + len(firsts) == len(users) * REQUESTS_PER_USER == 1200
    assert mixups(list(results), echoes_medium=True) == []
    # Each (identity, context) cost exactly one upstream call: concurrent misses were
    # coalesced per user and context, never across them.
    contexts: set[tuple[str, str | None]] = {(u.who, None) for u in users if u.kind == "anonymous"}
    contexts |= {(user.who, medium) for user, medium in plan}
    assert upstream.calls("fetch") == len(contexts)
    sent = {
        (
            r.body["identifiers"].get("customer_id")
            or r.body["identifiers"]["user_identifiers"]["u_em"],
            r.body.get("utm_medium"),
        )
        for r in upstream.requests("fetch")
    }
    assert sent == contexts


class DelayedBackend(FakeBackend):
    """The fake backend answering after a random 0-5 ms: answers interleave freely."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    async def fetch_experiences(self, keys: Any, **kwargs: Any) -> dict[str, Experience]:
        await asyncio.sleep(self.rng.uniform(0, 0.005))
        return await super().fetch_experiences(keys, **kwargs)


async def test_300_users_3000_requests_at_once_zero_mixups_while_a_tiny_cache_churns() -> None:
    backend = DelayedBackend(seed=11)
    app = middleware(backend=backend, cache_maxsize=16, cache_ttl=0.05, stale_while_revalidate=0.05)
    users = population(scale=3)  # 300 users
    rng = random.Random(13)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://shop.test"
    ) as client:
        await first_visits(client, users)
        plan = visits(users, rng)
        results = await asyncio.gather(*(view(client, user, medium) for user, medium in plan))
    await app.shutdown()
    assert len(results) == len(users) * REQUESTS_PER_USER - 120  # + 120 first visits = 3000
    assert mixups(list(results), echoes_medium=False) == []
    assert len(backend.calls) > len(users)  # the cache really churned
    assert app.store.stats.coalesced > 0  # and concurrent misses really were shared
