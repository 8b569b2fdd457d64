"""Campaign changes reach every process: an experience paused at the stand-in stops being
served by all four workers within the stated bound, found by one worker's metadata watcher
or announced by ``personalize-middleware refresh``; Active again, it is served again.

Each worker refreshes its own metadata only every 300 s here: without the broadcast the
workers would serve the paused experience from their caches for minutes."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from personalize_middleware import Identity, PersonalizeMiddleware, PersonalizeSettings
from tests.conftest import require_tool
from tests.support.fleet import Fleet, serve_fleet
from tests.support.http_server import run_asgi_server
from tests.support.redis_standin import Standin
from tests.support.redis_stores import customer
from tests.support.redis_support import REDIS_URL, delete_workspace, new_workspace, redis_available

pytestmark = [pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 4
#: The bound stated in docs/deployment-redis.md: pub/sub (ms) + one metadata call; a
#: process that missed the message finds the version moved within poll_interval (5 s).
BOUND = 10.0


@pytest.fixture
def workspace() -> Iterator[str]:
    require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
    ws = new_workspace()
    yield ws
    delete_workspace(ws)


def until_every_worker(fleet: Fleet, client: httpx.Client, user: str, serving: bool) -> float:
    """Seconds until every worker has served a page showing (``serving``) or not showing
    the hero; a worker that switched never switches back."""
    started = time.monotonic()
    switched: dict[int, float] = {}
    while len(switched) < fleet.workers:
        assert time.monotonic() - started < 3 * BOUND, f"switched: {sorted(switched)}"
        page = fleet.page(client, user)
        shows = page["titles"]["hero"] is not None
        if page["pid"] in switched:
            assert shows == serving, f"worker {page['pid']} switched back"
        elif shows == serving:
            switched[page["pid"]] = time.monotonic() - started
    return max(switched.values())


@pytest.mark.slow
def test_pausing_stops_every_worker_within_the_bound(workspace: str) -> None:
    stand = Standin()
    stand.statuses = {"hero": "Active", "banner": "Active"}
    with run_asgi_server(stand.app) as base_url:
        env = {
            "PM_FLEET_BASE_URL": base_url,
            "PM_FLEET_WORKSPACE": workspace,
            "PM_FLEET_REDIS_URL": REDIS_URL,
            "PM_FLEET_METADATA_REFRESH": "300",
        }
        with serve_fleet("uvicorn", WORKERS, env) as fleet, fleet.client() as client:
            deadline = time.monotonic() + 30
            while stand.metadata_calls < WORKERS:  # each watcher's first refresh
                assert time.monotonic() < deadline
                time.sleep(0.01)
            user = customer()
            until_every_worker(fleet, client, user, serving=True)  # cached everywhere

            def found_by_a_watcher() -> None:
                client.post("/_test/refresh-metadata").raise_for_status()

            def told_by_the_cli() -> None:
                subprocess.run(
                    [sys.executable, "-m", "personalize_middleware", "refresh"],
                    cwd=ROOT,
                    env={
                        **os.environ,
                        "MOENGAGE_REDIS_URL": REDIS_URL,
                        "MOENGAGE_WORKSPACE_ID": workspace,
                    },
                    check=True,
                    capture_output=True,
                )

            triggers: dict[str, Callable[[], None]] = {
                "watcher": found_by_a_watcher,
                "cli": told_by_the_cli,
            }
            # From the trigger (the watcher's refresh, or the CLI's start) to the last
            # worker switching, and for the CLI also from its return (its own start-up,
            # ~1 s of imports on a busy machine, is not propagation).
            timings: dict[str, list[float]] = {"watcher": [], "cli": [], "cli_after_return": []}
            for _ in range(3):
                for status, how in (("Paused", "watcher"), ("Active", "cli"), ("Paused", "cli")):
                    stand.statuses["hero"] = status
                    started = time.monotonic()
                    triggers[how]()
                    returned = time.monotonic()
                    until_every_worker(fleet, client, user, serving=status == "Active")
                    timings[how].append(time.monotonic() - started)
                    if how == "cli":
                        timings["cli_after_return"].append(time.monotonic() - returned)
                stand.statuses["hero"] = "Active"
                found_by_a_watcher()
                until_every_worker(fleet, client, user, serving=True)
            received = fleet.each_worker(client)
    report = {
        how: {
            "median_s": round(statistics.median(values), 3),
            "max_s": round(max(values), 3),
            "min_s": round(min(values), 3),
            "n": len(values),
        }
        for how, values in timings.items()
    }
    print("propagation to 4 workers:", json.dumps(report))
    assert all(value < BOUND for values in timings.values() for value in values), report
    assert all(w["broadcasts_received"] > 0 for w in received.values())


@pytest.mark.anyio
async def test_without_redis_a_pause_stops_within_the_metadata_interval() -> None:
    stand = Standin()
    stand.statuses = {"hero": "Active"}
    with run_asgi_server(stand.app) as base_url:
        settings = PersonalizeSettings(workspace_id="WS1", api_secret="s", base_url=base_url)

        async def app(scope: object, receive: object, send: object) -> None:
            raise AssertionError("not reached")

        middleware = PersonalizeMiddleware(
            app,  # type: ignore[arg-type]
            settings=settings,
            routes={"/": ["hero"]},
            identify=lambda conn: Identity(customer_id="u1"),
            metadata_refresh=0.3,
            tracking=False,
        )
        await middleware.startup()
        try:
            assert middleware.metadata is not None
            while middleware.metadata.statuses is None:
                await _tick()
            query_keys = middleware.metadata.active(("hero",))
            assert query_keys == ("hero",)
            store = middleware.store
            from personalize_middleware._models import FetchQuery

            query = FetchQuery(Identity(customer_id="u1"), {})
            assert "hero" in await store.get(query, ["hero"])
            stand.statuses["hero"] = "Paused"
            started = time.monotonic()
            while middleware.metadata.active(("hero",)):
                assert time.monotonic() - started < 5 * 0.3
                await _tick()
            # The watcher forgot the key's entries too: the cache no longer answers it.
            assert store.lookup(query, ["hero"]) == ({}, ["hero"])
        finally:
            await middleware.shutdown()


async def _tick() -> None:
    import asyncio

    await asyncio.sleep(0.01)  # polling a real condition (the watcher's state)
