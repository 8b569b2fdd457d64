"""EventBatcher against a MoEngage stand-in over real HTTP (PersonalizeClient -> uvicorn)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.responses import Response

from personalize_middleware import PersonalizeClient, PersonalizeSettings
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN, EventAction
from personalize_middleware.tracking._batcher import EventBatcher
from tests.support.http_server import run_asgi_server
from tests.support.tracking_helpers import (
    API_SECRET,
    WORKSPACE_ID,
    Delay,
    EventsStandIn,
    context_for,
    error,
)

FAST = {"flush_interval": 0.05, "backoff_initial": 0.01, "backoff_max": 0.05}


def action(n: int, *, cid: str | None = None, click: bool = False) -> EventAction:
    attributes: dict[str, Any] = context_for(f"exp-{n % 3}")
    if cid is not None:
        attributes["cid"] = cid
    if click:
        attributes["b_id"] = "Add to Cart"
    return {
        "action": ACTION_CLICKED if click else ACTION_SHOWN,
        "moe_event_uuid": str(uuid.uuid4()),
        "event_time": int(time.time()),
        "platform": "web",
        "attributes": attributes,
    }


@pytest.fixture
def stand_in() -> Iterator[tuple[EventsStandIn, str]]:
    standin = EventsStandIn()
    with run_asgi_server(standin.app()) as url:
        yield standin, url
    assert standin.violations == []


@pytest.fixture
async def client(stand_in: tuple[EventsStandIn, str]) -> AsyncIterator[PersonalizeClient]:
    settings = PersonalizeSettings(
        workspace_id=WORKSPACE_ID,
        api_secret=API_SECRET,
        base_url=stand_in[1] + "/v1",
        read_timeout=0.5,
    )
    async with PersonalizeClient(settings) as http:
        yield http


def enqueue_many(batcher: EventBatcher, count: int, users: int) -> list[str]:
    uuids = []
    for n in range(count):
        item = action(n, click=n % 4 == 0)
        assert batcher.enqueue(f"user-{n % users}", item)
        uuids.append(item["moe_event_uuid"])
    return uuids


def assert_exactly_once(standin: EventsStandIn, uuids: list[str]) -> None:
    counts = Counter(a["moe_event_uuid"] for a in standin.delivered)
    assert sorted(counts) == sorted(uuids)
    assert set(counts.values()) == {1}


@pytest.mark.anyio
async def test_groups_by_user_at_most_100_elements_a_call(
    stand_in: tuple[EventsStandIn, str], client: PersonalizeClient
) -> None:
    standin, _ = stand_in
    batcher = EventBatcher(client, **FAST)
    await batcher.start()
    uuids = enqueue_many(batcher, 450, users=150)
    await batcher.flush()
    assert_exactly_once(standin, uuids)
    for _, body, _ in standin.calls:
        customers = [e["customer_id"] for e in body["elements"]]
        assert len(customers) <= 100
        assert len(customers) == len(set(customers))  # one element per user per call
    by_user = Counter(a["customer_id"] for a in standin.delivered)
    assert by_user == Counter({f"user-{n}": 3 for n in range(150)})
    assert batcher.stats.sent == 450 and batcher.stats.dropped == 0
    await batcher.aclose()


@pytest.mark.anyio
async def test_flushes_on_interval_without_a_full_batch(
    stand_in: tuple[EventsStandIn, str], client: PersonalizeClient
) -> None:
    standin, _ = stand_in
    batcher = EventBatcher(client, flush_interval=0.2)
    await batcher.start()
    queued_at = time.monotonic()
    uuids = enqueue_many(batcher, 3, users=2)
    assert await asyncio.to_thread(standin.wait_for, lambda d: len(d) == 3, 5.0)
    waited = time.monotonic() - queued_at
    assert 0.15 <= waited < 2.0
    assert_exactly_once(standin, uuids)
    assert len(standin.calls) == 1
    await batcher.aclose()


@pytest.mark.anyio
async def test_flushes_on_size_before_the_interval(
    stand_in: tuple[EventsStandIn, str], client: PersonalizeClient
) -> None:
    standin, _ = stand_in
    batcher = EventBatcher(client, flush_interval=30, max_elements=10)
    await batcher.start()
    enqueue_many(batcher, 10, users=10)
    assert await asyncio.to_thread(standin.wait_for, lambda d: len(d) == 10, 5.0)
    await batcher.aclose()


@pytest.mark.anyio
async def test_500s_then_recovery_delivers_every_event_exactly_once(
    stand_in: tuple[EventsStandIn, str], client: PersonalizeClient
) -> None:
    standin, _ = stand_in
    standin.plan = lambda number, body: error(500) if number < 4 else None
    batcher = EventBatcher(client, **FAST)
    await batcher.start()
    uuids = enqueue_many(batcher, 120, users=40)
    await batcher.flush()
    assert_exactly_once(standin, uuids)
    # The failed attempts carried the same uuids that were finally delivered.
    failed = [body for _, body, status in standin.calls if status == 500]
    assert len(failed) == 4
    retried = {a["moe_event_uuid"] for b in failed for e in b["elements"] for a in e["actions"]}
    assert retried and retried <= set(uuids)
    assert batcher.stats.retried > 0 and batcher.stats.dropped == 0
    assert batcher.stats.sent == 120
    await batcher.aclose()


@pytest.mark.anyio
async def test_timeouts_are_retried_with_the_same_uuids(
    stand_in: tuple[EventsStandIn, str], client: PersonalizeClient
) -> None:
    standin, _ = stand_in
    slow = {"left": 2}

    def plan(number: int, body: dict[str, Any]) -> Delay | None:
        if slow["left"]:
            slow["left"] -= 1
            return Delay(0.8, error(503))  # longer than the client's read timeout
        return None

    standin.plan = plan
    batcher = EventBatcher(client, **FAST)
    await batcher.start()
    uuids = enqueue_many(batcher, 5, users=2)
    await batcher.flush()
    assert_exactly_once(standin, uuids)
    assert batcher.stats.retried >= 10  # 5 actions, retried twice
    await batcher.aclose()


@pytest.mark.anyio
async def test_429_honours_retry_after(
    stand_in: tuple[EventsStandIn, str], client: PersonalizeClient
) -> None:
    standin, _ = stand_in
    standin.plan = lambda number, body: error(429, {"Retry-After": "1"}) if number == 0 else None
    batcher = EventBatcher(client, **FAST)
    await batcher.start()
    uuids = enqueue_many(batcher, 3, users=1)
    await batcher.flush()
    assert_exactly_once(standin, uuids)
    (first, _, _), (second, _, _) = standin.calls
    assert second - first >= 0.95
    await batcher.aclose()


@pytest.mark.anyio
async def test_400_isolates_and_drops_only_the_refused_action(
    stand_in: tuple[EventsStandIn, str],
    client: PersonalizeClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    standin, _ = stand_in

    def plan(number: int, body: dict[str, Any]) -> Response | None:
        cids = {a["attributes"]["cid"] for e in body["elements"] for a in e["actions"]}
        return error(400) if "poison" in cids else None

    standin.plan = plan
    batcher = EventBatcher(client, **FAST)
    await batcher.start()
    uuids = enqueue_many(batcher, 40, users=7)
    poison = action(99, cid="poison")
    batcher.enqueue("user-3", poison)  # shares an element with good actions of user-3
    uuids += enqueue_many(batcher, 20, users=5)
    with caplog.at_level(logging.WARNING, "personalize_middleware"):
        await batcher.flush()
    assert_exactly_once(standin, uuids)
    assert batcher.stats.dropped_rejected == 1 and batcher.stats.dropped == 1
    assert batcher.stats.sent == 60
    assert "refused an action" in caplog.text and poison["moe_event_uuid"] in caplog.text
    assert len(standin.calls) < 20  # bisection, not one call per action
    await batcher.aclose()


@pytest.mark.anyio
async def test_400_for_everything_does_not_cost_a_call_per_event(
    stand_in: tuple[EventsStandIn, str],
    client: PersonalizeClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    standin, _ = stand_in
    standin.plan = lambda number, body: error(400)  # e.g. a wrong MOE-APPKEY
    batcher = EventBatcher(client, **FAST)
    await batcher.start()
    enqueue_many(batcher, 100, users=50)
    with caplog.at_level(logging.ERROR, "personalize_middleware"):
        await batcher.flush()
    assert batcher.stats.dropped_rejected == 100 and batcher.stats.sent == 0
    assert len(standin.calls) <= 40  # not ~200 (a full bisection)
    assert "without isolating further" in caplog.text
    await batcher.aclose()


@pytest.mark.anyio
async def test_401_keeps_events_and_pauses(
    stand_in: tuple[EventsStandIn, str],
    client: PersonalizeClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    standin, _ = stand_in
    standin.plan = lambda number, body: error(401) if number < 2 else None
    batcher = EventBatcher(client, **FAST, auth_pause=0.3)
    await batcher.start()
    uuids = enqueue_many(batcher, 5, users=2)
    with caplog.at_level(logging.ERROR, "personalize_middleware"):
        await batcher.flush()
    assert_exactly_once(standin, uuids)
    times = [t for t, _, _ in standin.calls]
    assert times[1] - times[0] >= 0.28 and times[2] - times[1] >= 0.28  # paused, no loop
    assert "401" in caplog.text and "kept" in caplog.text
    assert API_SECRET not in caplog.text
    assert batcher.stats.dropped == 0
    await batcher.aclose()


@pytest.mark.anyio
async def test_gives_up_after_max_retries_and_counts_it(
    stand_in: tuple[EventsStandIn, str], client: PersonalizeClient
) -> None:
    standin, _ = stand_in
    standin.plan = lambda number, body: error(502)
    batcher = EventBatcher(client, **FAST, max_retries=2)
    await batcher.start()
    enqueue_many(batcher, 4, users=2)
    await batcher.flush()
    assert len(standin.calls) == 3
    assert standin.delivered == []
    assert batcher.stats.dropped_failed == 4 and batcher.stats.sent == 0
    await batcher.aclose()


@pytest.mark.anyio
async def test_overflow_is_counted_and_logged(
    stand_in: tuple[EventsStandIn, str],
    client: PersonalizeClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    standin, _ = stand_in
    batcher = EventBatcher(client, **FAST, max_queue=5)
    with caplog.at_level(logging.WARNING, "personalize_middleware"):
        accepted = [batcher.enqueue("u", action(n)) for n in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert batcher.stats.dropped_overflow == 3 and batcher.stats.queued == 5
    assert "queue full" in caplog.text
    await batcher.flush()
    assert len(standin.delivered) == 5
    await batcher.aclose()


@pytest.mark.anyio
async def test_shutdown_flushes_within_the_deadline(
    stand_in: tuple[EventsStandIn, str], client: PersonalizeClient
) -> None:
    standin, _ = stand_in
    batcher = EventBatcher(client, flush_interval=60)  # only shutdown will send them
    await batcher.start()
    uuids = enqueue_many(batcher, 250, users=120)
    started = time.monotonic()
    await batcher.aclose(timeout=5)
    assert time.monotonic() - started < 5
    assert_exactly_once(standin, uuids)
    assert batcher.stats.sent == 250 and batcher.stats.dropped == 0
    assert not batcher.enqueue("late", action(1))  # closed: counted, not lost silently
    assert batcher.stats.dropped_overflow == 1


@pytest.mark.anyio
async def test_shutdown_against_a_failing_api_stops_at_the_deadline(
    stand_in: tuple[EventsStandIn, str],
    client: PersonalizeClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    standin, _ = stand_in
    standin.plan = lambda number, body: error(500)
    batcher = EventBatcher(client, flush_interval=0.01, backoff_initial=5, backoff_max=5)
    await batcher.start()
    enqueue_many(batcher, 10, users=3)
    assert await asyncio.to_thread(lambda: _wait_calls(standin, 1))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, "personalize_middleware"):
        await batcher.aclose(timeout=0.5)
    assert time.monotonic() - started < 1.5
    assert batcher.stats.dropped_shutdown == 10
    assert "not delivered" in caplog.text or "dropped" in caplog.text
    assert batcher.pending == 0


@pytest.mark.anyio
async def test_shutdown_during_a_hung_call_counts_the_batch(
    stand_in: tuple[EventsStandIn, str],
) -> None:
    """Regression: the batch being sent when the deadline cancels the sender was not
    counted (the sender's cleanup zeroed the in-flight count first)."""
    standin, url = stand_in
    standin.plan = lambda number, body: Delay(3.0, error(200))
    settings = PersonalizeSettings(
        workspace_id=WORKSPACE_ID, api_secret=API_SECRET, base_url=url + "/v1", read_timeout=10
    )
    async with PersonalizeClient(settings) as slow_client:
        batcher = EventBatcher(slow_client, flush_interval=0.01)
        await batcher.start()
        enqueue_many(batcher, 6, users=2)
        assert await _until(lambda: batcher.stats.calls == 1)  # the call is in flight
        started = time.monotonic()
        await batcher.aclose(timeout=0.3)
        assert time.monotonic() - started < 1.5
    assert batcher.stats.dropped_shutdown == 6
    assert batcher.pending == 0


@pytest.mark.anyio
async def test_restart_after_close(
    stand_in: tuple[EventsStandIn, str], client: PersonalizeClient
) -> None:
    """A lifespan that runs twice (test clients do) starts the batcher again."""
    standin, _ = stand_in
    batcher = EventBatcher(client, **FAST)
    await batcher.start()
    await batcher.aclose()
    await batcher.start()
    uuids = enqueue_many(batcher, 2, users=1)
    await batcher.flush()
    assert_exactly_once(standin, uuids)
    await batcher.aclose()


async def _until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _wait_calls(standin: EventsStandIn, count: int) -> bool:
    return standin.wait_for(lambda _: len(standin.calls) >= count, 5.0)
