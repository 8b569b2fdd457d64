"""Invalidation cannot be undone by a late answer: a fetch begun before ``invalidate``
never writes its answer after it, to L1 or L2, in this process or another.

The stand-in answers what was true when a call arrived (``versions``): a slow call that
came in before the login answers the earlier content after it."""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from personalize_middleware import Identity
from personalize_middleware._models import CachedExperience
from tests.conftest import require_tool
from tests.support.http_server import run_asgi_server
from tests.support.redis_standin import Rule, Standin
from tests.support.redis_stores import KEYS, customer, layer_of, open_store, query, wait_until
from tests.support.redis_support import REDIS_URL, delete_workspace, new_workspace, redis_available
from tests.support.store_process import StoreProcess

pytestmark = [pytest.mark.redis]


@pytest.fixture
def workspace() -> Iterator[str]:
    require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
    ws = new_workspace()
    yield ws
    delete_workspace(ws)


@pytest.fixture
def standin() -> Iterator[tuple[Standin, str]]:
    standin = Standin()
    with run_asgi_server(standin.app) as url:
        yield standin, url


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll a real condition from a sync test (another process's state)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def shared_titles(workspace: str, cid: str) -> list[str]:
    """Every title L2 holds for ``cid``, in every context."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        key = f"pm:v1:{{{workspace}}}:u:{query(cid).identity_hash}"
        values = client.hgetall(key)
    finally:
        client.close()
    return [v.decode() for f, v in values.items() if f != b"g"]


@pytest.mark.slow
def test_a_login_during_a_slow_fetch_never_shows_the_earlier_content_from_any_process(
    standin: tuple[Standin, str], workspace: str
) -> None:
    stand, base_url = standin
    user = customer()
    before, after = f"hello {user} [anonymous]", f"hello {user} [logged-in]"
    stand.versions[user] = "anonymous"
    config = {"base_url": base_url, "redis_url": REDIS_URL, "workspace": workspace}
    with StoreProcess(config) as p1, StoreProcess(config) as p2:
        # p1 holds the user in its L1 (another context) from before the login.
        assert p1.titles(user, "Friday") == dict.fromkeys(KEYS, before)
        gate = threading.Event()
        stand.rules[user] = Rule(gate=gate)
        # A page of p1 starts a fetch that the upstream holds; one of p2 waits for it.
        p1.ask("spawn", id="slow", customer=user, day="Monday")
        wait_for(lambda: stand.calls_for(user) == 2, "the slow call to arrive")
        p2.ask("spawn", id="waiter", customer=user, day="Monday")
        wait_for(lambda: p2.ask("stats")["layer"]["lease_waits"] >= 1, "p2 to wait")

        # The login: MoEngage answers the new content from now on; the app invalidates.
        stand.versions[user] = "logged-in"
        p2.ask("invalidate", customer=user)
        gate.set()  # ...and only now the slow, pre-login answer comes back
        p1.ask("join", id="slow")  # page views begun before the login: either content
        p2.ask("join", id="waiter")
        stale_writes = sum(p.ask("stats")["layer"]["l2_stale_writes"] for p in (p1, p2))
        assert stale_writes >= 1  # the late answer was offered to L2 and refused

        # p1 heard of the invalidation (its L1 copy of the other context goes with it).
        wait_for(lambda: p1.ask("stats")["received"] >= 1, "p1 to hear of the login")
        for process in (p1, p2, p1, p2):
            for day in ("Monday", "Friday"):
                assert process.titles(user, day) == dict.fromkeys(KEYS, after), day
        assert all("[logged-in]" in value for value in shared_titles(workspace, user))
    # A third process, started afterwards, reads L2 only: also the new content.
    with StoreProcess(config) as p3:
        assert p3.titles(user, "Monday") == dict.fromkeys(KEYS, after)


@pytest.mark.anyio
async def test_an_invalidation_in_this_process_detaches_the_fetch_in_flight(
    standin: tuple[Standin, str], workspace: str
) -> None:
    stand, base_url = standin
    user = customer()
    stand.versions[user] = "old"
    gate = threading.Event()
    stand.rules[user] = Rule(gate=gate)
    async with open_store(base_url, workspace) as store:
        slow = asyncio.ensure_future(store.get(query(user), KEYS, timeout=10))
        await wait_until(lambda: stand.calls_for(user) == 1)
        stand.versions[user] = "new"
        await store.invalidate(Identity(customer_id=user))
        # A request after the invalidation does not join the old fetch: it makes its own.
        fresh = asyncio.ensure_future(store.get(query(user), KEYS, timeout=10))
        await wait_until(lambda: stand.calls_for(user) == 2)
        gate.set()
        assert {e.get("title") for e in (await slow).values()} == {f"hello {user} [old]"}
        assert {e.get("title") for e in (await fresh).values()} == {f"hello {user} [new]"}
        # Neither L1 nor L2 kept the late answer.
        found, missing = store.lookup(query(user), KEYS)
        assert missing == [] and {e.get("title") for e in found.values() if e} == {
            f"hello {user} [new]"
        }
        assert all("[new]" in value for value in shared_titles(workspace, user))


@pytest.mark.anyio
async def test_a_write_under_an_older_generation_is_refused(
    standin: tuple[Standin, str], workspace: str
) -> None:
    _, base_url = standin
    user = customer()
    async with open_store(base_url, workspace) as store:
        layer = layer_of(store)
        q = query(user)
        read = await layer.get(q, KEYS)
        assert read.generation == ""  # never invalidated
        await layer.invalidate(Identity(customer_id=user))
        entry = {"hero": CachedExperience(None, time.time())}
        await layer.set(q, entry, 60.0, generation=read.generation)
        assert layer.stats.l2_stale_writes == 1 and shared_titles(workspace, user) == []
        current = await layer.get(q, KEYS)
        assert current.generation not in ("", read.generation)
        await layer.set(q, entry, 60.0, generation=current.generation)
        assert (await layer.get(q, ["hero"])) == entry
        # Generations only grow, even for invalidations in the same microsecond.
        await layer.invalidate(Identity(customer_id=user))
        assert int((await layer.get(q, KEYS)).generation or 0) > int(current.generation or 0)


@pytest.mark.anyio
async def test_other_processes_drop_their_copies_within_milliseconds(
    standin: tuple[Standin, str], workspace: str
) -> None:
    """How long after ``invalidate`` returns another process has dropped its L1 copy."""
    _, base_url = standin
    async with open_store(base_url, workspace) as a, open_store(base_url, workspace) as b:
        delays: list[float] = []
        for _ in range(20):
            user = customer()
            await a.get(query(user), KEYS)
            await b.get(query(user), KEYS)
            assert b.lookup(query(user), KEYS)[1] == []  # b holds it in L1
            await a.invalidate(Identity(customer_id=user))
            returned = time.perf_counter()
            while b.lookup(query(user), KEYS)[1] != KEYS:  # the real condition, polled finely
                assert time.perf_counter() - returned < 5.0
                await asyncio.sleep(0.0002)
            delays.append((time.perf_counter() - returned) * 1000)
    report = {
        "median_ms": round(statistics.median(delays), 2),
        "p90_ms": round(sorted(delays)[17], 2),
        "max_ms": round(max(delays), 2),
    }
    print("invalidation reaches another process:", json.dumps(report))
    assert max(delays) < 1000, report
