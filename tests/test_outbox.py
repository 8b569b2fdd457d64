"""The event outbox and the batcher on top of it, in one process: the memory, SQLite and
Redis outboxes against a MoEngage stand-in over real HTTP (and a real Redis).

Process crashes, SIGTERM and several processes sharing one outbox are in
``test_outbox_processes.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import types
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.responses import Response

from personalize_middleware import (
    Identity,
    Keyring,
    MemoryOutbox,
    PersonalizeClient,
    PersonalizeSettings,
    RedisOutbox,
    SQLiteOutbox,
    Tracking,
    TrackingLimits,
)
from personalize_middleware._interfaces import EventOutbox, OutboxEntry
from personalize_middleware._models import ACTION_SHOWN, EventAction
from personalize_middleware.tracking import TrackingToken, _delivery, encode_token
from personalize_middleware.tracking._batcher import EventBatcher
from personalize_middleware.tracking._fair import FairBuffer, body_size
from tests.conftest import require_tool
from tests.support.batcher_helpers import running_batcher
from tests.support.http_server import refused_url, run_asgi_server
from tests.support.redis_support import (
    REDIS_URL,
    delete_workspace,
    new_workspace,
    redis_available,
)
from tests.support.tracking_helpers import (
    API_SECRET,
    BROWSER_USER_AGENT,
    WORKSPACE_ID,
    Delay,
    EventsStandIn,
    context_for,
    error,
)

BROWSER = {"user-agent": BROWSER_USER_AGENT}  # httpx's own is on the crawler list
pytestmark = pytest.mark.anyio

FAST = {"flush_interval": 0.05, "backoff_initial": 0.01, "backoff_max": 0.05}
KEYRING = Keyring(["outbox-test-secret-0123456789"])
ALICE = Identity(customer_id="alice")
KINDS = ["memory", "sqlite", "redis"]

MakeOutbox = Callable[..., EventOutbox]


def action(n: int = 0, *, pad: int = 0) -> EventAction:
    attributes: dict[str, Any] = context_for(f"exp-{n % 3}")
    if pad:
        attributes["note"] = "x" * pad
    return {
        "action": ACTION_SHOWN,
        "moe_event_uuid": str(uuid.uuid4()),
        "event_time": int(time.time()),
        "platform": "web",
        "attributes": attributes,
    }


def pairs(count: int, users: int, prefix: str = "user") -> list[tuple[str, EventAction]]:
    return [(f"{prefix}-{n % users}", action(n)) for n in range(count)]


def uuids_of(items: list[tuple[str, EventAction]]) -> list[str]:
    return [a["moe_event_uuid"] for _, a in items]


def wire_size(body: dict[str, Any]) -> int:
    return len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())


@pytest.fixture
def server() -> Iterator[tuple[EventsStandIn, str]]:
    standin = EventsStandIn()
    with run_asgi_server(standin.app()) as url:
        yield standin, url
    assert standin.violations == []


@pytest.fixture
def standin(server: tuple[EventsStandIn, str]) -> EventsStandIn:
    return server[0]


@pytest.fixture
async def client(server: tuple[EventsStandIn, str]) -> AsyncIterator[PersonalizeClient]:
    settings = PersonalizeSettings(
        workspace_id=WORKSPACE_ID, api_secret=API_SECRET, base_url=server[1] + "/v1"
    )
    async with PersonalizeClient(settings) as http:
        yield http


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
    return str(request.param)


@pytest.fixture
def make_outbox(kind: str, tmp_path: Path) -> Iterator[MakeOutbox]:
    """Outboxes of ``kind``; those made twice share one file / one stream."""
    workspace = new_workspace()

    def make(**options: Any) -> EventOutbox:
        if kind == "memory":
            return MemoryOutbox(**options)
        if kind == "sqlite":
            return SQLiteOutbox(tmp_path / "events.sqlite", **options)
        return RedisOutbox(REDIS_URL, workspace_id=workspace, **options)

    yield make
    if kind == "redis":
        delete_workspace(workspace)


def accepted(standin: EventsStandIn) -> Counter[str]:
    return Counter(a["moe_event_uuid"] for a in standin.delivered)


def assert_exactly_once(standin: EventsStandIn, uuids: list[str]) -> None:
    counts = accepted(standin)
    assert sorted(counts) == sorted(uuids)
    assert set(counts.values()) == {1}


# -- every outbox ---------------------------------------------------------------------------


async def test_every_outbox_delivers_each_event_exactly_once(
    standin: EventsStandIn, client: PersonalizeClient, make_outbox: MakeOutbox
) -> None:
    items = pairs(450, users=150)
    async with running_batcher(client, outbox=make_outbox(), **FAST) as batcher:
        for start in range(0, len(items), 50):  # beacons of 50
            assert await batcher.store(items[start : start + 50])
        await batcher.flush()
        assert_exactly_once(standin, uuids_of(items))
        assert batcher.stats.sent == batcher.stats.queued == 450
        assert batcher.stats.dropped == 0 and batcher.pending == 0
        for _, body, _ in standin.calls:
            customers = [e["customer_id"] for e in body["elements"]]
            assert len(customers) == len(set(customers)) <= 100


async def test_an_outage_longer_than_eight_attempts_loses_nothing(
    standin: EventsStandIn, client: PersonalizeClient, make_outbox: MakeOutbox
) -> None:
    """Regression: the batcher gave up a batch after 8 attempts (46-92 s of outage with the
    default backoff): retries are now bounded by the events' age, not by a count."""
    standin.plan = lambda number, body: error(503) if number < 30 else None
    items = pairs(60, users=20)
    async with running_batcher(client, outbox=make_outbox(), **FAST) as batcher:
        assert await batcher.store(items)
        await batcher.flush()
        assert_exactly_once(standin, uuids_of(items))
        assert sum(1 for _, _, status in standin.calls if status == 503) == 30
        assert batcher.stats.dropped == 0 and batcher.stats.retried >= 30 * 1


async def test_a_413_splits_the_batch_instead_of_dropping_it(
    standin: EventsStandIn, client: PersonalizeClient, make_outbox: MakeOutbox
) -> None:
    """Regression: a 413 was "not retryable": the whole batch (3,440 events) was dropped."""
    limit = 40_000
    standin.plan = lambda number, body: error(413) if wire_size(body) > limit else None
    items = [(f"user-{n % 30}", action(n, pad=300)) for n in range(400)]  # ~280 KB
    async with running_batcher(client, outbox=make_outbox(), **FAST) as batcher:
        assert await batcher.store(items)
        await batcher.flush()
        assert_exactly_once(standin, uuids_of(items))
        assert batcher.stats.dropped == 0 and batcher.stats.split_too_large > 0
        # Later batches stay under what the API refused.
        refused = sum(1 for _, _, status in standin.calls if status == 413)
        more = [(f"late-{n % 30}", action(n, pad=300)) for n in range(200)]
        assert await batcher.store(more)
        await batcher.flush()
        assert sum(1 for _, _, status in standin.calls if status == 413) == refused
        assert batcher.max_batch_bytes <= limit
        assert_exactly_once(standin, uuids_of(items + more))


async def test_one_visitors_flood_neither_fills_the_outbox_nor_crowds_out_the_others(
    standin: EventsStandIn, client: PersonalizeClient, make_outbox: MakeOutbox
) -> None:
    """Regression: one bot's 3,500 events and 20 visitors' went out as one 1.43 MB call,
    answered 413, and all 3,440 were dropped. Now: calls stay under the byte limit, the
    bot's share of the outbox is capped, every real visitor's event is delivered."""
    limit = 64 * 1024

    def slow(number: int, body: dict[str, Any]) -> Delay | Response | None:
        if wire_size(body) > limit:
            return error(413)
        return Delay(0.2)  # slow, and fine

    standin.plan = slow
    bot = [("bot", action(n)) for n in range(3_500)]
    real = [(f"visitor-{n % 20}", action(n)) for n in range(100)]
    options = {**FAST, "max_batch_bytes": limit, "flush_interval": 0.5}
    async with running_batcher(
        client, outbox=make_outbox(max_per_visitor=500), **options
    ) as batcher:
        for start in range(0, 3_500, 50):  # the bot's beacons and the visitors' interleave
            assert await batcher.store(bot[start : start + 50])
            if start // 50 < 20:
                assert await batcher.store(real[start // 10 : start // 10 + 5])
        await batcher.flush()
    delivered = accepted(standin)
    assert all(delivered[u] == 1 for u in uuids_of(real))  # every real visitor's event
    bot_delivered = sum(1 for u in uuids_of(bot) if u in delivered)
    # The bot never had more than its share (500) waiting; the rest was refused, counted.
    assert bot_delivered >= 500 and batcher.stats.dropped_flood == 3_500 - bot_delivered
    assert batcher.stats.dropped == batcher.stats.dropped_flood > 0
    assert all(status != 413 for _, _, status in standin.calls)
    assert max(wire_size(body) for _, body, _ in standin.calls) <= limit


async def test_events_older_than_max_event_age_are_dropped_and_counted(
    standin: EventsStandIn,
    client: PersonalizeClient,
    make_outbox: MakeOutbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    standin.plan = lambda number, body: error(503)
    async with running_batcher(client, outbox=make_outbox(), max_event_age=0.5, **FAST) as batcher:
        with caplog.at_level(logging.ERROR, "personalize_middleware"):
            assert await batcher.store(pairs(20, users=4))
            await batcher.flush()
        assert batcher.stats.dropped_expired == 20 and batcher.pending == 0
        assert "older than max_event_age" in caplog.text


@pytest.mark.parametrize("horizon", [None, 600.0])
async def test_a_15_minute_outage_loses_nothing_with_the_default_horizon(
    standin: EventsStandIn,
    client: PersonalizeClient,
    make_outbox: MakeOutbox,
    monkeypatch: pytest.MonkeyPatch,
    horizon: float | None,
) -> None:
    """A simulated clock: every failed call is another minute of outage, 16 in all. With
    the default ``max_event_age`` (1 hour) nothing is lost; with 10 minutes, all is."""
    minutes = [0]
    real_time = time.time
    clock = types.SimpleNamespace(
        time=lambda: real_time() + 60 * minutes[0], monotonic=time.monotonic
    )
    monkeypatch.setattr(_delivery, "time", clock)

    def plan(number: int, body: dict[str, Any]) -> Response | None:
        if minutes[0] < 16:
            minutes[0] += 1
            return error(503)
        return None

    standin.plan = plan
    items = pairs(300, users=50)
    options = {} if horizon is None else {"max_event_age": horizon}
    async with running_batcher(client, outbox=make_outbox(), **FAST, **options) as batcher:
        assert await batcher.store(items)
        await batcher.flush()
        if horizon is None:
            assert_exactly_once(standin, uuids_of(items))
            assert batcher.stats.dropped == 0 and minutes[0] == 16
        else:
            assert batcher.stats.dropped_expired == 300 and not standin.delivered


async def test_shutdown_keeps_undelivered_events_in_a_durable_outbox(
    standin: EventsStandIn, client: PersonalizeClient, make_outbox: MakeOutbox, kind: str
) -> None:
    """Regression: SIGTERM while the events API was slow lost every queued event."""
    slow = {"left": 1}

    def plan(number: int, body: dict[str, Any]) -> Delay | None:
        if slow["left"]:
            slow["left"] -= 1
            return Delay(2.0, error(503))
        return None

    standin.plan = plan
    items = pairs(300, users=60)
    async with running_batcher(client, outbox=make_outbox(), **FAST) as batcher:
        assert await batcher.store(items)
        await _until(lambda: batcher.stats.calls >= 1)
        await batcher.aclose(timeout=0.3)
    if kind == "memory":
        assert batcher.stats.dropped_shutdown == 300  # in memory: lost, and counted
        return
    assert batcher.stats.dropped == 0 and batcher.stats.left_in_outbox == 300
    async with running_batcher(client, outbox=make_outbox(), **FAST) as successor:
        await successor.flush()
        assert successor.stats.sent == 300 and successor.stats.dropped == 0
    assert set(accepted(standin)) == set(uuids_of(items))


async def test_enqueue_is_written_to_a_durable_outbox_in_the_background(
    standin: EventsStandIn, client: PersonalizeClient, make_outbox: MakeOutbox
) -> None:
    items = pairs(30, users=3)
    async with running_batcher(client, outbox=make_outbox(), **FAST) as batcher:
        assert all(batcher.enqueue(cid, a) for cid, a in items)  # server-side impressions
        await batcher.flush()
        assert_exactly_once(standin, uuids_of(items))


# -- the beacon endpoint -------------------------------------------------------------------


def make_token(render_id: str = "render-1") -> str:
    event = TrackingToken(
        kind="shown",
        key="hero",
        context=context_for("hero"),
        render_id=render_id,
        expires=int(time.time() + 600),
    )
    return encode_token(KEYRING, ALICE, event)


def identity_app(tracking: Tracking) -> Any:
    """Every request is alice's."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await tracking.handle(scope, receive, send, ALICE)

    return app


async def beacon(client: httpx.AsyncClient, tokens: list[str]) -> httpx.Response:
    headers = {"origin": "http://testserver", "sec-fetch-site": "same-origin"}
    return await client.post("/_personalize/events", json={"events": tokens}, headers=headers)


async def test_a_beacon_is_answered_503_when_the_outbox_cannot_store_it(
    standin: EventsStandIn, client: PersonalizeClient
) -> None:
    with refused_url() as url:
        outbox = RedisOutbox(url.replace("http://", "redis://"), workspace_id="ws-down")
        tracking = Tracking(
            keyring=KEYRING, backend=client, outbox=outbox, limits=TrackingLimits.off()
        )
        await tracking.start()
        transport = httpx.ASGITransport(app=identity_app(tracking))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers=BROWSER
        ) as http:
            response = await beacon(http, [make_token()])
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert tracking.stats.batcher.dropped_unstored == 1
            assert tracking.stats.accepted == 0
        await tracking.aclose()


async def test_a_beacon_is_answered_only_after_its_events_are_in_the_outbox(
    tmp_path: Path, client: PersonalizeClient
) -> None:
    tracking = Tracking(
        keyring=KEYRING,
        backend=client,
        outbox_path=tmp_path / "ev.sqlite",
        limits=TrackingLimits.off(),
    )
    tracking.batcher.flush_interval = 3600  # nothing is delivered during the test
    await tracking.start()
    transport = httpx.ASGITransport(app=identity_app(tracking))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers=BROWSER
    ) as http:
        tokens = [make_token(render_id=f"r{n}") for n in range(5)]
        assert (await beacon(http, tokens)).status_code == 204
        # Another connection to the file sees them at once: they were committed.
        reader = SQLiteOutbox(tmp_path / "ev.sqlite")
        await reader.start()
        assert len(await reader.take(100)) == 5
        await reader.aclose()
    await tracking.aclose(timeout=0.1)


# -- SQLite ------------------------------------------------------------------------------


async def test_sqlite_outbox_frees_the_rows_a_dead_process_held(tmp_path: Path) -> None:
    first = SQLiteOutbox(tmp_path / "ev.sqlite")
    await first.start()
    await first.put(pairs(20, users=2), time.time())
    assert len(await first.take(100)) == 20  # leased to `first`
    # `first` dies holding them. Its owner id names this pid with another token: a
    # process restarted in a container under the same pid frees them at once.
    second = SQLiteOutbox(tmp_path / "ev.sqlite")
    await second.start()
    assert len(await second.take(100)) == 20
    await second.aclose()
    await first.aclose()


async def test_sqlite_outbox_refuses_an_unusable_path(tmp_path: Path) -> None:
    outbox = SQLiteOutbox(tmp_path / "missing-dir" / "ev.sqlite")
    with pytest.raises(Exception, match="cannot open the event outbox"):
        await outbox.start()


# -- Redis ---------------------------------------------------------------------------------


@pytest.fixture
def workspace() -> Iterator[str]:
    require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
    ws = new_workspace()
    yield ws
    delete_workspace(ws)


async def test_redis_entries_of_a_stopped_consumer_are_taken_over(workspace: str) -> None:
    alive = RedisOutbox(REDIS_URL, workspace_id=workspace, claim_timeout=0.6)
    dead = RedisOutbox(REDIS_URL, workspace_id=workspace, claim_timeout=0.6)
    other = RedisOutbox(REDIS_URL, workspace_id=workspace, claim_timeout=0.6)
    for outbox in (alive, dead, other):
        await outbox.start()
    await alive.put(pairs(10, users=2, prefix="a"), time.time())
    assert len(await alive.take(10)) == 10
    await dead.put(pairs(10, users=2, prefix="d"), time.time())
    assert len(await dead.take(10)) == 10
    assert dead._renewer is not None
    dead._renewer.cancel()  # it stops renewing: as if it had died
    taken: list[OutboxEntry] = []
    deadline = time.monotonic() + 5
    while len(taken) < 10 and time.monotonic() < deadline:
        taken += await other.take(100)
        await asyncio.sleep(0.1)
    assert sorted({e.customer_id for e in taken}) == ["d-0", "d-1"]  # not the live one's
    for _ in range(5):  # the live holder keeps renewing: never taken over
        assert await other.take(100) == []
        await asyncio.sleep(0.2)
    await other.ack(taken)
    assert other.pending == 10
    for outbox in (alive, dead, other):
        await outbox.aclose()


async def test_redis_outbox_counts_each_visitor_once_per_entry(workspace: str) -> None:
    outbox = RedisOutbox(REDIS_URL, workspace_id=workspace, max_per_visitor=3)
    await outbox.start()
    result = await outbox.put([("v", action(n)) for n in range(5)], time.time())
    assert (result.stored, result.flood) == (3, 2)
    entries = await outbox.take(10)
    await outbox.ack(entries)
    await outbox.ack(entries)  # twice (two processes delivered it): counted down once
    result = await outbox.put([("v", action(n)) for n in range(5)], time.time())
    assert (result.stored, result.flood) == (3, 2)
    await outbox.aclose()


# -- fair batches ----------------------------------------------------------------------------


def entry(customer_id: str, n: int, pad: int = 0) -> OutboxEntry:
    return OutboxEntry(f"{customer_id}-{n}", customer_id, action(n, pad=pad), -1, float(n))


def test_batches_take_every_visitor_in_turn_within_the_byte_limit() -> None:
    buffer = FairBuffer()
    buffer.add(entry("bot", n) for n in range(3_500))
    buffer.add(entry(f"visitor-{v}", n) for n in range(3) for v in range(20))
    first = buffer.next_batch(100, 64 * 1024)
    assert body_size(first) <= 64 * 1024
    assert {e.customer_id for e in first} >= {f"visitor-{v}" for v in range(20)}
    assert sum(1 for e in first if e.customer_id != "bot") == 60  # all of them at once
    rest = buffer.next_batch(100, 64 * 1024)
    assert {e.customer_id for e in rest} == {"bot"}


def test_an_action_too_big_for_any_batch_goes_alone() -> None:
    buffer = FairBuffer()
    buffer.add([entry("a", 1, pad=5_000), entry("b", 2)])
    assert [e.customer_id for e in buffer.next_batch(100, 1_000)] == ["a"]
    assert [e.customer_id for e in buffer.next_batch(100, 1_000)] == ["b"]
    assert len(buffer) == 0


def test_batches_hold_at_most_max_users_visitors() -> None:
    buffer = FairBuffer()
    buffer.add(entry(f"u{n % 150}", n) for n in range(450))
    sizes = []
    while len(buffer):
        batch = buffer.next_batch(100, 10**7)
        sizes.append(len({e.customer_id for e in batch}))
    assert max(sizes) == 100 and sum(1 for _ in sizes) >= 2


async def test_durable_batcher_knows_its_outbox(tmp_path: Path, client: PersonalizeClient) -> None:
    batcher = EventBatcher(client, outbox=SQLiteOutbox(tmp_path / "e.sqlite"))
    assert batcher.durable
    assert not EventBatcher(client).durable
    assert "SQLiteOutbox" in repr(batcher)


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
