"""Fork safety: ``gunicorn --preload -w 2 -k uvicorn.workers.UvicornWorker``.

With ``--preload`` the app (and the middleware: ``tests/support/fleet_app.py`` wraps it
explicitly) is built in the master, then every worker is forked from it. The warm-up
variant also starts the middleware in the master and fetches once there: an event loop,
a started batcher, an httpx pool and a Redis pool, all made before the fork. Each worker
must still fetch (personalized pages) and deliver its events (the stand-in counts them)."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_tool
from tests.support.faulty_upstream import FaultyUpstream, title_for
from tests.support.fleet import serve_fleet
from tests.support.redis_support import REDIS_URL, delete_workspace, new_workspace, redis_available

pytestmark = [pytest.mark.slow, pytest.mark.redis]

WORKERS = 2
KEYS = ("hero", "banner")


@pytest.fixture
def upstream() -> Iterator[FaultyUpstream]:
    require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
    ws = new_workspace()
    stand_in = FaultyUpstream(workspace_id=ws, api_secret="fleet-secret", known_keys=("hero",))
    with stand_in.serve():
        yield stand_in
    assert stand_in.violations == []
    delete_workspace(ws)


@pytest.mark.parametrize("warmup", [False, True], ids=["plain", "warmed-up-before-fork"])
def test_preloaded_workers_fetch_and_deliver_events(upstream: FaultyUpstream, warmup: bool) -> None:
    require_tool(importlib.util.find_spec("gunicorn") is not None, "gunicorn (the dev extra)")
    env = {
        "PM_FLEET_BASE_URL": upstream.base_url,
        "PM_FLEET_WORKSPACE": upstream.workspace_id,
        "PM_FLEET_REDIS_URL": REDIS_URL,
        "PM_FLEET_TRACKING": "1",
        "PM_FLEET_WARMUP": "1" if warmup else "0",
    }
    users = [f"user-{i}" for i in range(24)]
    with serve_fleet("gunicorn", WORKERS, env) as fleet, fleet.client() as client:
        pages = [fleet.page(client, user) for user in users]
        served_by = {page["pid"] for page in pages}
        assert len(served_by) == WORKERS  # both workers served pages...
        for user, page in zip(users, pages, strict=True):  # ...personalized ones
            assert page["titles"] == {key: title_for(user, key) for key in KEYS}
        # Every impression reaches the events API, once, from the worker that made it.
        deadline = time.monotonic() + 20
        impressions = len(users) * len(KEYS)
        while len(upstream.accepted_uuids) < impressions:
            assert time.monotonic() < deadline, f"{len(upstream.accepted_uuids)} events arrived"
            time.sleep(0.05)  # the batcher flushes every second
        workers = fleet.each_worker(client)
        assert all(w["state"] == "running" for w in workers.values())
        assert sum(w["events_sent"] for w in workers.values()) == impressions
    assert set(upstream.accepted_uuids.values()) == {1}
    assert len(upstream.accepted_uuids) == impressions
    assert fleet.proc.returncode == 0
