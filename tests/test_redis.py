"""RedisSharedLayer behind ExperienceStore, against the real Redis server and a stand-in
MoEngage over real HTTP. Several stores in one test stand for several processes: each
has its own layer (own connection pool) and its own L1, sharing only Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from typing import Any

import pytest
import redis

from personalize_middleware import (
    ConfigurationError,
    Identity,
    PersonalizeSettings,
    RedisSharedLayer,
)
from personalize_middleware.cache.redis._limiter import LocalShare, RateLimitGrant, RedisRateLimiter
from tests.conftest import require_tool
from tests.support.http_server import refused_url, run_asgi_server
from tests.support.redis_standin import Rule, Standin
from tests.support.redis_stores import KEYS, customer, layer_of, open_store, query, wait_until
from tests.support.redis_support import (
    REDIS_URL,
    delete_workspace,
    new_workspace,
    redis_available,
)

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture(scope="module")
def standin_url() -> Iterator[tuple[Standin, str]]:
    standin = Standin()
    with run_asgi_server(standin.app) as url:
        yield standin, url


@pytest.fixture
def standin(standin_url: tuple[Standin, str]) -> Standin:
    return standin_url[0]


@pytest.fixture
def base_url(standin_url: tuple[Standin, str]) -> str:
    return standin_url[1]


@pytest.fixture
def workspace() -> Iterator[str]:
    require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
    ws = new_workspace()
    yield ws
    delete_workspace(ws)


@pytest.fixture
def sync_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    yield client
    client.close()


# -- shared cache ----------------------------------------------------------------------


async def test_second_process_is_served_from_redis(
    standin: Standin, base_url: str, workspace: str
) -> None:
    cid = customer()
    async with open_store(base_url, workspace) as a, open_store(base_url, workspace) as b:
        first = await a.get(query(cid), KEYS)
        second = await b.get(query(cid), KEYS)
        assert standin.calls_for(cid) == 1
        assert layer_of(b).stats.l2_hits == 2
        assert b.stats.upstream_calls == 0
        for key in KEYS:
            assert second[key] == first[key]
            assert second[key].payload == {"title": f"hello {cid}", "count": 3, "tags": []}
            assert dict(second[key].raw_payload) == dict(first[key].raw_payload)
        # Another context of the same user is another answer: not shared.
        await b.get(query(cid, DAY="Tuesday"), KEYS)
        assert standin.calls_for(cid) == 2


async def test_freshness_windows_apply_to_redis_entries(
    standin: Standin, base_url: str, workspace: str, sync_redis: redis.Redis
) -> None:
    cid = customer()
    offset = 0.0

    def later() -> float:
        return time.time() + offset

    windows = {"ttl": 60.0, "stale_while_revalidate": 60.0, "stale_if_error": 600.0}
    async with open_store(base_url, workspace, store_options=windows) as a:
        await a.get(query(cid), KEYS)
    # Minutes pass for the stores' clocks; in Redis the short-lived "done" marker of that
    # fetch would be long gone too.
    sync_redis.delete(layer_key(workspace, cid, lease=True))
    # Within ttl: fresh from Redis, no call.
    offset = 30.0
    async with open_store(base_url, workspace, clock=later, store_options=windows) as b:
        assert set(await b.get(query(cid), KEYS)) == set(KEYS)
        assert layer_of(b).stats.l2_hits == 2
    assert standin.calls_for(cid) == 1
    # Past ttl with the upstream failing: the Redis entry serves as stale-if-error.
    standin.rules[cid] = Rule(status=500)
    offset = 300.0
    async with open_store(base_url, workspace, clock=later, store_options=windows) as c:
        assert set(await c.get(query(cid), KEYS)) == set(KEYS)
        assert c.stats.fallbacks == 2
    assert standin.calls_for(cid) == 2
    # Past stale-if-error: defaults.
    offset = 700.0
    async with open_store(base_url, workspace, clock=later, store_options=windows) as d:
        assert await d.get(query(cid), KEYS) == {}
    del standin.rules[cid]


async def test_invalidate_clears_l1_and_redis(
    standin: Standin, base_url: str, workspace: str, sync_redis: redis.Redis
) -> None:
    cid, other = customer(), customer()
    async with open_store(base_url, workspace) as a, open_store(base_url, workspace) as b:
        await a.get(query(cid), KEYS)
        await a.get(query(cid, DAY="Friday"), KEYS)
        await a.get(query(other), KEYS)
        await b.get(query(cid), KEYS)  # b's L1 now holds it too
        assert standin.calls_for(cid) == 2
        await b.invalidate(Identity(customer_id=cid))
        # Every context gone in one step; what is left is the identity's new generation.
        assert sync_redis.hkeys(layer_key(workspace, cid)) == [b"g"]
        assert sync_redis.exists(layer_key(workspace, other))
        assert b.lookup(query(cid), KEYS) == ({}, KEYS)  # L1 too
        async with open_store(base_url, workspace) as c:
            await c.get(query(cid, DAY="Friday"), KEYS)  # neither level has it
            assert standin.calls_for(cid) == 3
            await c.get(query(other), KEYS)  # other identities untouched
            assert standin.calls_for(other) == 1


def layer_key(workspace: str, cid: str, *, lease: bool = False) -> str:
    """The data key of ``cid`` (default context), or the lease key of a fetch of KEYS."""
    layer = RedisSharedLayer(REDIS_URL, workspace_id=workspace)
    if lease:
        return layer.lease_key(query(cid), KEYS)
    return layer.data_key(query(cid).identity_hash)


async def test_keys_hold_digests_never_raw_identities(
    base_url: str, workspace: str, sync_redis: redis.Redis
) -> None:
    cid = "alice@example.com"
    async with open_store(base_url, workspace) as a:
        await a.get(query(cid), KEYS)
    keys = [k.decode() for k in sync_redis.scan_iter(match=f"pm:v1:{{{workspace}}}:*")]
    assert any(":u:" in k for k in keys) and any(":l:" in k for k in keys)
    assert all("alice" not in k and "example" not in k for k in keys)
    for field in sync_redis.hkeys(next(k for k in keys if ":u:" in k)):
        assert b"alice" not in field


async def test_values_over_the_size_bound_are_not_shared(
    standin: Standin, base_url: str, workspace: str
) -> None:
    cid = customer()
    async with (
        open_store(base_url, workspace, max_value_bytes=200) as a,
        open_store(base_url, workspace, max_value_bytes=200) as b,
    ):
        assert set(await a.get(query(cid), KEYS)) == set(KEYS)  # L1 still serves it
        assert layer_of(a).stats.l2_oversize == 2
        await b.get(query(cid), KEYS)
        assert standin.calls_for(cid) == 2  # nothing to share
    cid = customer()
    async with (
        open_store(base_url, workspace, max_value_bytes=4096) as a,
        open_store(base_url, workspace, max_value_bytes=4096) as b,
    ):
        await a.get(query(cid), KEYS)
        await b.get(query(cid), KEYS)
        assert standin.calls_for(cid) == 1


FOREIGN_VALUES: list[bytes] = [
    b"not json",
    b"\xff\xfe\x00",
    b"[1, 2]",
    b'{"t": 1}',
    b'{"t": "yesterday", "x": null}',
    b'{"t": true, "x": null}',
    b'{"t": 1e400, "x": null}',
    json.dumps({"t": time.time() + 86400 * 365, "x": None}).encode(),
    json.dumps({"t": time.time(), "x": "a string"}).encode(),
    json.dumps({"t": time.time(), "x": {"payload": [1]}}).encode(),
    json.dumps({"t": time.time(), "x": {"payload": {}}, "pad": "z" * 70000}).encode(),
    b"[" * 100000,
]


@pytest.mark.parametrize("raw", FOREIGN_VALUES, ids=range(len(FOREIGN_VALUES)))
async def test_malformed_or_foreign_values_are_misses(
    raw: bytes, standin: Standin, base_url: str, workspace: str, sync_redis: redis.Redis
) -> None:
    cid = customer()
    q = query(cid)
    sync_redis.hset(layer_key(workspace, cid), f"{q.context_hash}:hero", raw)
    async with open_store(base_url, workspace) as a:
        got = await a.get(q, ["hero"])
        assert got["hero"].get("title") == f"hello {cid}"  # fetched, not the foreign value
        assert standin.calls_for(cid) == 1
        assert layer_of(a).stats.l2_malformed == 1
    stored = sync_redis.hget(layer_key(workspace, cid), f"{q.context_hash}:hero")
    assert stored is not None and json.loads(stored)["x"]["payload"]["title"]["value"]


async def test_a_foreign_key_type_is_replaced_not_fatal(
    standin: Standin, base_url: str, workspace: str, sync_redis: redis.Redis
) -> None:
    cid = customer()
    sync_redis.set(layer_key(workspace, cid), "a string, not a hash")
    async with open_store(base_url, workspace) as a, open_store(base_url, workspace) as b:
        assert set(await a.get(query(cid), KEYS)) == set(KEYS)
        assert not layer_of(a).is_degraded  # the server answered: no outage backoff
        await b.get(query(cid), KEYS)
        assert standin.calls_for(cid) == 1  # the write replaced the foreign key


# -- single-flight ---------------------------------------------------------------------


async def test_cold_user_on_many_processes_is_fetched_once(
    standin: Standin, base_url: str, workspace: str
) -> None:
    cid = customer()
    gate = threading.Event()
    standin.rules[cid] = Rule(gate=gate)
    async with AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(open_store(base_url, workspace)) for _ in "abcde"]
        gets = [asyncio.create_task(s.get(query(cid), KEYS)) for s in stores for _ in range(4)]
        await wait_until(lambda: standin.calls_for(cid) == 1)
        await wait_until(lambda: sum(layer_of(s).stats.lease_waits for s in stores) == 4)
        gate.set()
        results = await asyncio.gather(*gets)
    assert all(set(r) == set(KEYS) for r in results)
    assert standin.calls_for(cid) == 1
    stats = [layer_of(s).stats for s in stores]
    assert sum(s.lease_acquired for s in stats) == 1
    assert sum(s.lease_served for s in stats) == 4


async def test_waiters_take_over_when_the_holder_died(
    standin: Standin, base_url: str, workspace: str, sync_redis: redis.Redis
) -> None:
    cid = customer()
    async with open_store(base_url, workspace) as a:
        layer = layer_of(a)
        # A holder that took the lease and crashed: its lease just runs out.
        sync_redis.set(layer.lease_key(query(cid), KEYS), "dead-holder", px=300)
        started = time.monotonic()
        assert set(await a.get(query(cid), KEYS)) == set(KEYS)
        assert time.monotonic() - started >= 0.25
        assert layer.stats.lease_waits == 1 and layer.stats.lease_takeovers == 1
        assert standin.calls_for(cid) == 1


async def test_a_stuck_holder_is_waited_for_at_most_max_wait(
    standin: Standin, base_url: str, workspace: str, sync_redis: redis.Redis
) -> None:
    cid = customer()
    async with open_store(base_url, workspace, max_wait=0.2) as a:
        layer = layer_of(a)
        sync_redis.set(layer.lease_key(query(cid), KEYS), "stuck-holder", px=30_000)
        assert set(await a.get(query(cid), KEYS)) == set(KEYS)
        assert layer.stats.lease_timeouts == 1
        assert standin.calls_for(cid) == 1


async def test_a_failed_fetch_is_not_repeated_by_every_waiter(
    standin: Standin, base_url: str, workspace: str
) -> None:
    cid = customer()
    gate = threading.Event()
    standin.rules[cid] = Rule(status=500, gate=gate)
    async with AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(open_store(base_url, workspace)) for _ in "abc"]
        gets = [asyncio.create_task(s.get(query(cid), KEYS)) for s in stores]
        await wait_until(lambda: sum(layer_of(s).stats.lease_waits for s in stores) == 2)
        gate.set()
        results = await asyncio.gather(*gets)
    assert results == [{}, {}, {}]  # defaults everywhere, no 500 page
    assert standin.calls_for(cid) == 1
    assert sum(layer_of(s).stats.lease_failed for s in stores) == 2


# -- rate limit and 429 ----------------------------------------------------------------


async def test_budget_is_shared_by_all_processes(
    standin: Standin, base_url: str, workspace: str
) -> None:
    users = [customer() for _ in range(6)]
    async with (
        open_store(base_url, workspace, rate_limit_per_minute=3) as a,
        open_store(base_url, workspace, rate_limit_per_minute=3) as b,
    ):
        for i, cid in enumerate(users):
            await (a if i % 2 else b).get(query(cid), KEYS)
        assert sum(standin.calls_for(cid) for cid in users) == 3
        denied = layer_of(a).stats.rate_limited + layer_of(b).stats.rate_limited
        assert denied == 3
        # A user fetched before the budget ran out still renders from the cache.
        assert set(await a.get(query(users[0]), KEYS)) == set(KEYS)


async def test_a_call_of_more_than_25_keys_costs_one_unit_per_chunk(
    standin: Standin, base_url: str, workspace: str
) -> None:
    many = [f"k{i}" for i in range(30)]
    first, second = customer(), customer()
    async with open_store(base_url, workspace, rate_limit_per_minute=3) as a:
        assert len(await a.get(query(first), many)) == 30  # 2 calls of <= 25 keys
        assert standin.calls_for(first) == 2
        assert await a.get(query(second), many) == {}  # needs 2, only 1 left
        assert standin.calls_for(second) == 0


async def test_a_429_pauses_every_process(
    standin: Standin, base_url: str, workspace: str, sync_redis: redis.Redis
) -> None:
    limited, other = customer(), customer()
    standin.rules[limited] = Rule(status=429, headers={"Retry-After": "1"})
    async with open_store(base_url, workspace) as a, open_store(base_url, workspace) as b:
        assert await a.get(query(limited), KEYS) == {}
        pause_ms = sync_redis.pttl(layer_of(a).pause_key)
        assert 500 < pause_ms <= 1000
        assert await b.get(query(other), KEYS) == {}  # b never saw the 429 itself
        assert standin.calls_for(other) == 0
        assert layer_of(b).stats.paused == 1
        assert b.breaker.state == "closed"
        # The pause ends with its key: then fetching resumes everywhere.
        await wait_until(lambda: sync_redis.pttl(layer_of(a).pause_key) < 0)
        assert set(await b.get(query(other), KEYS)) == set(KEYS)
    del standin.rules[limited]


async def test_a_stalled_budget_check_makes_no_call(
    standin: Standin, base_url: str, workspace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never_answers(
        self: RedisRateLimiter, cost: int = 1, unsynced: Sequence[float] = ()
    ) -> RateLimitGrant:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(RedisRateLimiter, "acquire", never_answers)
    cid = customer()
    async with open_store(base_url, workspace, op_timeout=0.05) as a:
        assert await a.get(query(cid), KEYS) == {}  # defaults: calling unchecked could
        assert standin.calls_for(cid) == 0  # overspend the workspace's budget
        assert layer_of(a).stats.budget_unchecked == 1
        assert not layer_of(a).is_degraded  # a stall, not an outage


# -- Redis failures degrade ------------------------------------------------------------


async def test_redis_unreachable_means_l1_only_with_one_log_line(
    standin: Standin, base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="personalize_middleware.redis")
    with refused_url() as http_url:
        url = http_url.replace("http://", "redis://")
        async with open_store(base_url, "ws-down", url=url) as a:
            for _ in range(5):
                cid = customer()
                started = time.monotonic()
                assert set(await a.get(query(cid), KEYS)) == set(KEYS)
                assert time.monotonic() - started < 1.0
                assert standin.calls_for(cid) == 1
            assert set(await a.get(query(cid), KEYS)) == set(KEYS)  # L1 hit
            assert standin.calls_for(cid) == 1
            assert layer_of(a).is_degraded and layer_of(a).stats.l2_errors >= 1
    lines = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(lines) == 1
    assert "secret" not in caplog.text


async def test_during_an_outage_each_process_keeps_to_its_share(
    standin: Standin, base_url: str
) -> None:
    with refused_url() as http_url:
        url = http_url.replace("http://", "redis://")
        async with open_store(base_url, "ws-down", url=url, rate_limit_per_minute=3) as a:
            users = [customer() for _ in range(5)]
            served = [bool(await a.get(query(cid), KEYS)) for cid in users]
    assert served == [True, True, True, False, False]
    assert sum(standin.calls_for(cid) for cid in users) == 3


def test_local_share_divides_the_budget_by_the_processes_seen() -> None:
    share = LocalShare(budget=10, window=60.0)
    share.processes = 3
    assert share.share == 3
    assert [share.try_take(1) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = share.try_take(1)
    assert 59.0 < wait <= 60.0  # when the oldest of this process's calls leaves the window
    share.processes = 20
    assert share.share == 1  # never zero: a process may always make some progress


def test_local_share_counts_its_part_of_the_other_processes_grants() -> None:
    # Redis said: 4 processes, 40 grants in the window, 2 of them this process's. During
    # an outage this process may then make 15 - 2 - 38/4 = 3 more, not 13.
    share = LocalShare(budget=60, window=60.0)
    share.record(2, processes=4, used=40)
    waits = [share.try_take(1) for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] > 0
    # Its outage calls go to the shared log on the next grant, and for one window after
    # that a call must still fit the share (others' outage calls may not be logged yet).
    assert len(share.unsynced()) == 3 and share.recovering


# -- configuration ---------------------------------------------------------------------


def test_from_settings_and_repr_hide_the_password() -> None:
    settings = PersonalizeSettings(
        workspace_id="WS9",
        api_secret="api-secret-value",
        redis_url="redis://user:hunter2@cache.internal:6380/2?password=hunter2",
    )
    layer = RedisSharedLayer.from_settings(settings, rate_limit_per_minute=100)
    text = repr(layer)
    assert "hunter2" not in text and "api-secret-value" not in text
    assert "cache.internal:6380/2" in text and "100/60s" in text
    assert layer.data_key("abc") == "pm:v1:{WS9}:u:abc"
    assert layer.rate_limit_key == "pm:v1:{WS9}:rl"
    with pytest.raises(ConfigurationError, match="redis_url is not set"):
        RedisSharedLayer.from_settings(PersonalizeSettings(workspace_id="W", api_secret="s"))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"workspace_id": "bad id"}, "workspace_id"),
        ({"workspace_id": "W", "namespace": "a:b"}, "namespace"),
        ({"workspace_id": "W", "rate_limit_per_minute": 0}, "rate_limit_per_minute"),
        ({"workspace_id": "W", "lease_ttl": -1}, "lease_ttl"),
        ({"workspace_id": "W", "op_timeout": 0}, "op_timeout"),
        ({"workspace_id": "W", "max_value_bytes": 0}, "max_value_bytes"),
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RedisSharedLayer(REDIS_URL, **options)
    assert info.value.field == field


def test_bad_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="redis://"):
        RedisSharedLayer("http://127.0.0.1:6379", workspace_id="W")


def test_missing_redis_package_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigurationError, match=r"personalize-middleware\[redis\]"):
        RedisSharedLayer(REDIS_URL, workspace_id="W")
