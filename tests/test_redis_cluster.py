"""The shared layer on a real Redis Cluster: three masters started by the test
(``tests/support/redis_cluster.py``), reached through ``redis+cluster://``.

Every Lua script touches several keys (lease + pause + data; the limiter's two sorted sets;
data + the generation), which Redis Cluster allows only within one hash slot: the
``{workspace}`` hash tag puts all of a workspace's keys in one. Several workspaces land on
different masters, so redirection is exercised too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from personalize_middleware import Identity, PersonalizeSettings, RedisSharedLayer
from personalize_middleware.cache.redis import KeyNames
from tests.support.http_server import run_asgi_server
from tests.support.redis_cluster import PrivateCluster, private_cluster
from tests.support.redis_standin import Rule, Standin
from tests.support.redis_stores import KEYS, customer, layer_of, open_store, query, wait_until
from tests.support.redis_support import new_workspace
from tests.support.redis_worker import run_workers

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: Three redis-servers, the stand-in and the test share two cores: an operation may take
#: longer than the default 0.1 s, which the layer would treat as a stall (and skip).
SLOW_MACHINE = 1.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    with private_cluster() as started:
        yield started


@pytest.fixture(scope="module")
def standin() -> Iterator[tuple[Standin, str]]:
    stand = Standin()
    with run_asgi_server(stand.app) as url:
        yield stand, url


def slot_of(cluster: PrivateCluster, key: bytes | str) -> int:
    return int(cluster.ask(cluster.ports[0], "CLUSTER", "KEYSLOT", key))  # type: ignore[call-overload]


def test_the_url_forms_parse_and_a_bad_one_is_a_configuration_error() -> None:
    settings = PersonalizeSettings(
        workspace_id="W", api_secret="s", redis_url="redis+cluster://a:7000,b:7001"
    )
    layer = RedisSharedLayer.from_settings(settings)
    assert layer._conn.target.nodes == (("a", 7000), ("b", 7001))
    sentinel = RedisSharedLayer(
        "redis+sentinel://:hunter2@s1:26379,s2/mymaster/2?sentinel_password=x", workspace_id="W"
    )
    target = sentinel._conn.target
    assert (target.kind, target.service, target.db) == ("sentinel", "mymaster", 2)
    assert target.password == "hunter2"
    assert target.nodes == (("s1", 26379), ("s2", 26379)) and target.sentinel_password == "x"
    assert "hunter2" not in repr(sentinel) and "hunter2" not in repr(target)
    from personalize_middleware import ConfigurationError

    for bad in ("redis+cluster://a:7000/3", "redis+sentinel://s1:26379", "memcached://x"):
        with pytest.raises(ConfigurationError) as info:
            RedisSharedLayer(bad, workspace_id="W")
        assert info.value.field == "redis_url"


@pytest.mark.anyio
async def test_shared_cache_lease_generation_and_broadcast_on_a_cluster(
    cluster: PrivateCluster, standin: tuple[Standin, str]
) -> None:
    stand, base_url = standin
    workspaces = [new_workspace() for _ in range(6)]
    slots = {slot_of(cluster, KeyNames(ws).key("x")) for ws in workspaces}
    assert len(slots) > 1  # several slots: the workspaces are spread over the masters
    for ws in workspaces:
        user = customer()
        stand.rules[user] = Rule(delay=0.2)  # the burst overlaps the one fetch
        async with (
            open_store(base_url, ws, url=cluster.url, op_timeout=SLOW_MACHINE) as a,
            open_store(base_url, ws, url=cluster.url, op_timeout=SLOW_MACHINE) as b,
        ):
            # Cross-"process" single-flight (lease script), then L2 (set script).
            results = await asyncio.gather(
                *(store.get(query(user), KEYS) for store in (a, b) for _ in range(10))
            )
            assert all(set(r) == set(KEYS) for r in results)
            assert stand.calls_for(user) == 1
            assert layer_of(a).stats.l2_errors == 0 and layer_of(b).stats.l2_errors == 0
            # Invalidation (generation script + publish): b hears it and drops its L1.
            received = layer_of(b).broadcast.received
            await a.invalidate(Identity(customer_id=user))
            await wait_until(lambda: layer_of(b).broadcast.received > received)
            assert b.lookup(query(user), KEYS) == ({}, KEYS)
            assert set(await b.get(query(user), KEYS)) == set(KEYS)
            assert stand.calls_for(user) == 2
            # A refresh reaches the other process too.
            heard: list[object] = []
            layer_of(b).add_listener(heard.append)
            assert await layer_of(a).publish_refresh(["hero"]) >= 2
            await wait_until(lambda: bool(heard))
        keys = cluster.keys(f"pm:*{{{ws}}}*")
        assert keys, "nothing was written"
        assert {slot_of(cluster, key) for key in keys} == {slot_of(cluster, KeyNames(ws).key(""))}


@pytest.mark.anyio
async def test_the_limiter_and_the_pause_on_a_cluster(
    cluster: PrivateCluster, standin: tuple[Standin, str]
) -> None:
    _, base_url = standin
    ws = new_workspace()
    async with open_store(
        base_url, ws, url=cluster.url, rate_limit_per_minute=3, op_timeout=SLOW_MACHINE
    ) as a:
        users = [customer() for _ in range(5)]
        served = [bool(await a.get(query(cid), KEYS)) for cid in users]
        assert served == [True, True, True, False, False]  # the budget, in Redis
        assert layer_of(a).stats.rate_limited >= 2
        assert not layer_of(a).is_degraded
        paused = await layer_of(a).budget.limiter.pause(2.0)  # type: ignore[union-attr]
        assert 1.0 < paused <= 2.0


def test_four_processes_share_one_fetch_through_the_cluster(
    cluster: PrivateCluster, standin: tuple[Standin, str]
) -> None:
    stand, base_url = standin
    user = customer()
    stand.rules[user] = Rule(delay=0.3)
    config = {
        "mode": "burst",
        "redis_url": cluster.url,
        "workspace": new_workspace(),
        "base_url": base_url,
        "layer": {"op_timeout": SLOW_MACHINE},
        "keys": KEYS,
        "customer": user,
        "n": 25,
    }
    started = time.monotonic()
    results = run_workers([config] * 4)
    assert sum(r["served"] for r in results) == 100
    assert stand.calls_for(user) == 1, f"{time.monotonic() - started:.1f}s"
    assert sum(r["layer"]["lease_acquired"] for r in results) == 1
