"""Redis failures degrade, never break: a private redis-server of the test's own is
killed (SIGKILL) mid-test and restarted, paused (slow Redis) and flushed, while stores keep
serving from the stand-in over HTTP; sharing resumes by itself."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest

from personalize_middleware import Identity
from tests.conftest import require_tool
from tests.support.http_server import run_asgi_server
from tests.support.redis_standin import Standin
from tests.support.redis_stores import KEYS, customer, layer_of, open_store, query, wait_until
from tests.support.redis_support import PrivateRedis, new_workspace, redis_server_binary

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture(scope="module")
def standin_url() -> Iterator[tuple[Standin, str]]:
    standin = Standin()
    with run_asgi_server(standin.app) as url:
        yield standin, url


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    binary = redis_server_binary()
    require_tool(binary is not None, "redis-server (to start a private Redis)")
    assert binary is not None
    private = PrivateRedis(binary)
    private.start()
    yield private
    private.stop()


async def test_redis_killed_mid_test_then_back(
    standin_url: tuple[Standin, str], server: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    standin, base_url = standin_url
    ws = new_workspace()
    async with (
        open_store(base_url, ws, url=server.url) as a,
        open_store(base_url, ws, url=server.url) as b,
    ):

        async def fetched_by_both() -> tuple[int, float]:
            """A new user seen by a, then by b: upstream calls and the slower latency."""
            cid = customer()
            slowest = 0.0
            for store in (a, b):
                started = time.monotonic()
                assert set(await store.get(query(cid), KEYS)) == set(KEYS)
                slowest = max(slowest, time.monotonic() - started)
            return standin.calls_for(cid), slowest

        assert (await fetched_by_both())[0] == 1  # shared through Redis
        server.stop()
        for _ in range(5):  # pages keep working, each process on its own
            calls, slowest = await fetched_by_both()
            assert calls == 2
            assert slowest < 1.0
        assert layer_of(a).is_degraded and layer_of(b).is_degraded
        server.start()
        # No restart, no reconnect call: the layers find Redis again by themselves.
        deadline = time.monotonic() + 10.0
        while (await fetched_by_both())[0] != 1:
            assert time.monotonic() < deadline, "sharing did not resume"
            await asyncio.sleep(0.05)
        assert not layer_of(a).is_degraded and not layer_of(b).is_degraded
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("Redis unavailable" in m for m in messages) <= 2  # one line per layer


async def test_slow_redis_is_cut_short_then_bypassed(
    standin_url: tuple[Standin, str], server: PrivateRedis
) -> None:
    standin, base_url = standin_url
    ws = new_workspace()
    options = {"op_timeout": 0.05, "stall_tolerance": 0.3, "rate_limit_per_minute": 1000}
    async with open_store(base_url, ws, url=server.url, **options) as a:
        await a.get(query(customer()), KEYS)  # connected and warm
        admin = server.client()
        admin.execute_command("CLIENT", "PAUSE", "2000", "ALL")  # every command now hangs
        paused_at = time.monotonic()
        try:
            # A stall first: Redis is asked again (fetching now could duplicate another
            # process's fetch or break the budget), until it lasts stall_tolerance: then it
            # is an outage, and the fetch goes out unchecked (within this process's share).
            cid = customer()
            assert set(await a.get(query(cid), KEYS)) == set(KEYS)
            assert 0.3 <= time.monotonic() - paused_at < 1.0
            assert standin.calls_for(cid) == 1
            assert layer_of(a).is_degraded and layer_of(a).stats.degraded == 1
            # During the outage Redis is not even asked: no waiting at all.
            cid = customer()
            started = time.monotonic()
            assert set(await a.get(query(cid), KEYS)) == set(KEYS)
            assert time.monotonic() - started < 0.2
        finally:
            admin.ping()  # returns once the pause is over
            admin.close()
        await wait_until(lambda: layer_of(a).retry_in == 0)
        await a.get(query(customer()), KEYS)
        assert not layer_of(a).is_degraded


async def test_flushed_redis_loses_entries_and_scripts_but_keeps_working(
    standin_url: tuple[Standin, str], server: PrivateRedis
) -> None:
    standin, base_url = standin_url
    ws = new_workspace()
    cid = customer()
    async with (
        open_store(base_url, ws, url=server.url, rate_limit_per_minute=100) as a,
        open_store(base_url, ws, url=server.url, rate_limit_per_minute=100) as b,
    ):
        await a.get(query(cid), KEYS)
        admin = server.client()
        admin.flushall()
        admin.script_flush()
        admin.close()
        await b.get(query(cid), KEYS)  # gone from Redis: fetched again
        assert standin.calls_for(cid) == 2
        other = customer()
        await a.get(query(other), KEYS)  # the scripts are loaded again on demand
        await b.get(query(other), KEYS)
        assert standin.calls_for(other) == 1
        assert not layer_of(a).is_degraded and not layer_of(b).is_degraded


async def test_an_invalidation_missed_while_redis_was_down_is_applied_on_recovery(
    standin_url: tuple[Standin, str], server: PrivateRedis
) -> None:
    _, base_url = standin_url
    ws = new_workspace()
    cid = customer()
    async with open_store(base_url, ws, url=server.url) as a:
        await a.get(query(cid), KEYS)
        server.stop()
        await a.invalidate(Identity(customer_id=cid))  # Redis unreachable: remembered
        server.start()
        # Meanwhile a process that never noticed the outage shares an entry for cid.
        async with open_store(base_url, ws, url=server.url) as b:
            await b.get(query(cid), KEYS)
        admin = server.client()
        data_key = layer_of(a).data_key(query(cid).identity_hash)
        assert len(admin.hkeys(data_key)) == len(KEYS)
        await wait_until(lambda: layer_of(a).retry_in == 0)
        await a.get(query(customer()), KEYS)  # a's next Redis call finds it back...
        # ...and replays the invalidation: the entries go, a new generation starts.
        await wait_until(lambda: admin.hkeys(data_key) == [b"g"])
        admin.close()
