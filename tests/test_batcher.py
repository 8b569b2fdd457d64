"""EventBatcher against a MoEngage stand-in over real HTTP (PersonalizeClient -> uvicorn)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import pytest
from starlette.responses import Response

from personalize_middleware import PersonalizeClient, PersonalizeSettings
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN, EventAction
from personalize_middleware.tracking._batcher import EventBatcher
from tests.support.batcher_helpers import running_batcher
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
def server() -> Iterator[tuple[EventsStandIn, str]]:
    standin = EventsStandIn()
    with run_asgi_server(standin.app()) as url:
        yield standin, url
    assert standin.violations == []


@pytest.fixture
def standin(server: tuple[EventsStandIn, str]) -> EventsStandIn:
    return server[0]


def settings_for(url: str, read_timeout: float) -> PersonalizeSettings:
    return PersonalizeSettings(
        workspace_id=WORKSPACE_ID,
        api_secret=API_SECRET,
        base_url=url + "/v1",
        read_timeout=read_timeout,
    )


@pytest.fixture
async def client(server: tuple[EventsStandIn, str]) -> AsyncIterator[PersonalizeClient]:
    async with PersonalizeClient(settings_for(server[1], read_timeout=0.5)) as http:
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
    standin: EventsStandIn, client: PersonalizeClient
) -> None:
    async with running_batcher(client, **FAST) as batcher:
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


@pytest.mark.anyio
async def test_flushes_on_interval_without_a_full_batch(
    standin: EventsStandIn, client: PersonalizeClient
) -> None:
    async with running_batcher(client, flush_interval=0.2) as batcher:
        queued_at = time.monotonic()
        uuids = enqueue_many(batcher, 3, users=2)
        assert await asyncio.to_thread(standin.wait_for, lambda d: len(d) == 3, 5.0)
        waited = time.monotonic() - queued_at
        assert 0.15 <= waited < 2.0
        assert_exactly_once(standin, uuids)
        assert len(standin.calls) == 1


@pytest.mark.anyio
async def test_flushes_on_size_before_the_interval(
    standin: EventsStandIn, client: PersonalizeClient
) -> None:
    async with running_batcher(client, flush_interval=30, max_elements=10) as batcher:
        enqueue_many(batcher, 10, users=10)
        assert await asyncio.to_thread(standin.wait_for, lambda d: len(d) == 10, 5.0)


@pytest.mark.anyio
async def test_500s_then_recovery_delivers_every_event_exactly_once(
    standin: EventsStandIn, client: PersonalizeClient
) -> None:
    standin.plan = lambda number, body: error(500) if number < 4 else None
    async with running_batcher(client, **FAST) as batcher:
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


@pytest.mark.anyio
async def test_timeouts_are_retried_with_the_same_uuids(
    standin: EventsStandIn, client: PersonalizeClient
) -> None:
    slow = {"left": 2}

    def plan(number: int, body: dict[str, Any]) -> Delay | None:
        if slow["left"]:
            slow["left"] -= 1
            return Delay(0.8, error(503))  # longer than the client's read timeout
        return None

    standin.plan = plan
    async with running_batcher(client, **FAST) as batcher:
        uuids = enqueue_many(batcher, 5, users=2)
        await batcher.flush()
        assert_exactly_once(standin, uuids)
        assert batcher.stats.retried >= 10  # 5 actions, retried twice


@pytest.mark.anyio
async def test_429_honours_retry_after(standin: EventsStandIn, client: PersonalizeClient) -> None:
    standin.plan = lambda number, body: error(429, {"Retry-After": "1"}) if number == 0 else None
    async with running_batcher(client, **FAST) as batcher:
        uuids = enqueue_many(batcher, 3, users=1)
        await batcher.flush()
        assert_exactly_once(standin, uuids)
        (first, _, _), (second, _, _) = standin.calls
        assert second - first >= 0.95


@pytest.mark.anyio
async def test_400_isolates_and_drops_only_the_refused_action(
    standin: EventsStandIn, client: PersonalizeClient, caplog: pytest.LogCaptureFixture
) -> None:
    def plan(number: int, body: dict[str, Any]) -> Response | None:
        cids = {a["attributes"]["cid"] for e in body["elements"] for a in e["actions"]}
        return error(400) if "poison" in cids else None

    standin.plan = plan
    async with running_batcher(client, **FAST) as batcher:
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


@pytest.mark.anyio
async def test_400_for_everything_does_not_cost_a_call_per_event(
    standin: EventsStandIn, client: PersonalizeClient, caplog: pytest.LogCaptureFixture
) -> None:
    standin.plan = lambda number, body: error(400)  # e.g. a wrong MOE-APPKEY
    async with running_batcher(client, **FAST) as batcher:
        enqueue_many(batcher, 100, users=50)
        with caplog.at_level(logging.ERROR, "personalize_middleware"):
            await batcher.flush()
        assert batcher.stats.dropped_rejected == 100 and batcher.stats.sent == 0
        assert len(standin.calls) <= 40  # not ~200 (a full bisection)
        assert "without isolating further" in caplog.text


@pytest.mark.anyio
async def test_401_keeps_events_and_pauses(
    standin: EventsStandIn, client: PersonalizeClient, caplog: pytest.LogCaptureFixture
) -> None:
    standin.plan = lambda number, body: error(401) if number < 2 else None
    async with running_batcher(client, **FAST, auth_pause=0.3) as batcher:
        uuids = enqueue_many(batcher, 5, users=2)
        with caplog.at_level(logging.ERROR, "personalize_middleware"):
            await batcher.flush()
        assert_exactly_once(standin, uuids)
        times = [t for t, _, _ in standin.calls]
        assert times[1] - times[0] >= 0.28 and times[2] - times[1] >= 0.28  # paused, no loop
        assert "401" in caplog.text and "kept" in caplog.text
        assert API_SECRET not in caplog.text
        assert batcher.stats.dropped == 0


@pytest.mark.anyio
async def test_gives_up_after_max_retries_and_counts_it(
    standin: EventsStandIn, client: PersonalizeClient
) -> None:
    standin.plan = lambda number, body: error(502)
    async with running_batcher(client, **FAST, max_retries=2) as batcher:
        enqueue_many(batcher, 4, users=2)
        await batcher.flush()
        assert len(standin.calls) == 3
        assert standin.delivered == []
        assert batcher.stats.dropped_failed == 4 and batcher.stats.sent == 0


@pytest.mark.anyio
async def test_overflow_is_counted_and_logged(
    standin: EventsStandIn, client: PersonalizeClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Not started on purpose: events queue before the sender exists; flush() starts it.
    async with aclosing(EventBatcher(client, **FAST, max_queue=5)) as batcher:
        with caplog.at_level(logging.WARNING, "personalize_middleware"):
            accepted = [batcher.enqueue("u", action(n)) for n in range(8)]
        assert accepted == [True] * 5 + [False] * 3
        assert batcher.stats.dropped_overflow == 3 and batcher.stats.queued == 5
        assert "queue full" in caplog.text
        await batcher.flush()
        assert len(standin.delivered) == 5


@pytest.mark.anyio
async def test_shutdown_flushes_within_the_deadline(
    standin: EventsStandIn, client: PersonalizeClient
) -> None:
    # flush_interval=60: only shutdown will send them.
    async with running_batcher(client, flush_interval=60) as batcher:
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
    standin: EventsStandIn, client: PersonalizeClient, caplog: pytest.LogCaptureFixture
) -> None:
    standin.plan = lambda number, body: error(500)
    options = {"flush_interval": 0.01, "backoff_initial": 5, "backoff_max": 5}
    async with running_batcher(client, **options) as batcher:
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
    server: tuple[EventsStandIn, str],
) -> None:
    """Regression: the batch being sent when the deadline cancels the sender was not
    counted (the sender's cleanup zeroed the in-flight count first)."""
    standin, url = server
    standin.plan = lambda number, body: Delay(3.0, error(200))
    async with (
        PersonalizeClient(settings_for(url, read_timeout=10)) as slow_client,
        running_batcher(slow_client, flush_interval=0.01) as batcher,
    ):
        enqueue_many(batcher, 6, users=2)
        assert await _until(lambda: batcher.stats.calls == 1)  # the call is in flight
        started = time.monotonic()
        await batcher.aclose(timeout=0.3)
        assert time.monotonic() - started < 1.5
    assert batcher.stats.dropped_shutdown == 6
    assert batcher.pending == 0


@pytest.mark.anyio
async def test_restart_after_close(standin: EventsStandIn, client: PersonalizeClient) -> None:
    """A lifespan that runs twice (test clients do) starts the batcher again."""
    async with running_batcher(client, **FAST) as batcher:
        await batcher.aclose()
        await batcher.start()
        uuids = enqueue_many(batcher, 2, users=1)
        await batcher.flush()
        assert_exactly_once(standin, uuids)


@pytest.mark.anyio
async def test_running_batcher_closes_the_sender_when_the_test_fails(
    client: PersonalizeClient,
) -> None:
    """Regression: a failing assertion before ``aclose()`` left the sender task running."""
    with pytest.raises(AssertionError, match="a failing test"):
        async with running_batcher(client, **FAST) as batcher:
            enqueue_many(batcher, 3, users=1)
            raise AssertionError("a failing test")
    assert not batcher.enqueue("late", action(1))  # closed
    assert batcher.pending == 0


async def _until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _wait_calls(standin: EventsStandIn, count: int) -> bool:
    return standin.wait_for(lambda _: len(standin.calls) >= count, 5.0)
