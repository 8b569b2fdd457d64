"""The event outbox across real processes: uvicorn workers (``tests/support/outbox_app``)
killed with SIGKILL or stopped with SIGTERM mid-outage, a MoEngage stand-in over HTTP
that fails, is slow or refuses large bodies (413), and a real Redis.

Each test counts what the stand-in accepted by ``moe_event_uuid``: every page view's
events have uuids of their own (50 visits x 10 events = 500 distinct uuids), so "all of
them, each once" is ``len(accepted) == 500 and set(accepted.values()) == {1}``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import require_tool
from tests.support.faulty_upstream import Fault, FaultyUpstream, wait_until
from tests.support.outbox_app import API_SECRET, KEYS
from tests.support.redis_support import (
    REDIS_URL,
    delete_workspace,
    new_workspace,
    redis_available,
)
from tests.support.tracking_helpers import BROWSER_USER_AGENT

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
EVENTS_PER_VISIT = 2 * len(KEYS)
APP = "tests.support.outbox_app:create_app"


class Worker:
    """One uvicorn process serving the outbox app on a socket of its own."""

    def __init__(self, env: dict[str, str]) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        args = ["--fd", str(sock.fileno()), "--log-level", "warning"]
        # A file, not a pipe: a pipe nobody reads could fill up and block the worker.
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "tests.support.outbox_app:create_app",
                *args,
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            pass_fds=[sock.fileno()],
            stderr=self._log,
        )
        sock.close()
        self.client = httpx.AsyncClient(
            base_url=self.base, timeout=20.0, headers={"user-agent": BROWSER_USER_AGENT}
        )

    async def ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"the worker exited: {self.stderr()}"
            assert time.monotonic() < deadline, "the worker did not answer"
            try:
                if (await self.client.get("/stats")).status_code == 200:
                    return
            except httpx.TransportError:
                await asyncio.sleep(0.05)  # not listening yet

    async def visit(self, user: str) -> int:
        """A page view and its beacon (every impression and click); events accepted."""
        tokens = (await self.client.get("/", headers={"x-user": user})).json()
        assert len(tokens) == EVENTS_PER_VISIT
        response = await self.client.post(
            "/_personalize/events",
            json={"events": tokens},
            headers={"x-user": user, "origin": self.base},
        )
        assert response.status_code == 204, response.text
        return len(tokens)

    async def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = (await self.client.get("/stats")).json()
        return data

    def stderr(self) -> str:
        """What the process logged so far."""
        self._log.seek(0)
        return self._log.read()

    async def close(self) -> None:
        await self.client.aclose()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def upstream() -> Iterator[FaultyUpstream]:
    standin = FaultyUpstream(workspace_id="WS-OUTBOX", api_secret=API_SECRET, known_keys=KEYS)
    with standin.serve():
        yield standin


@pytest.fixture(params=["sqlite", "redis"])
def outbox_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """What a worker needs to use the durable outbox of this kind (the same for every
    worker of the test: a restarted one finds what the killed one left)."""
    workspace = new_workspace()
    env = {"PM_OB_WORKSPACE": workspace, "PM_OB_CLAIM_TIMEOUT": "2"}
    if request.param == "redis":
        require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
        env |= {"PM_OB_REDIS_URL": REDIS_URL, "PM_OB_OUTBOX": "redis"}
    else:
        env["PM_OB_OUTBOX"] = str(tmp_path / "events.sqlite")
    yield env
    if request.param == "redis":
        delete_workspace(workspace)


def worker_env(upstream: FaultyUpstream, env: dict[str, str], **extra: str) -> dict[str, str]:
    return {"PM_OB_BASE_URL": upstream.base_url, **env, **extra}


def pending_by_consumer(workspace: str) -> dict[str, int]:
    """Entries each consumer of the outbox's group holds (read, not acknowledged)."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        consumers = client.xinfo_consumers(f"pm:v1:{{{workspace}}}:ev", "pm-events")
        return {c["name"].decode(): int(c["pending"]) for c in consumers}
    finally:
        client.close()


def accepted_by_customer(upstream: FaultyUpstream) -> Counter[str]:
    """Actions per customer in events calls the stand-in accepted (answered 200)."""
    counts: Counter[str] = Counter()
    for call in upstream.requests("events"):
        limit = upstream.events_body_limit
        if call.fault in (Fault.OK, Fault.SLOW) and (limit is None or call.size <= limit):
            for element in call.body["elements"]:
                counts[element["customer_id"]] += len(element["actions"])
    return counts


async def test_kill_9_mid_outage_then_restart_delivers_every_event_exactly_once(
    upstream: FaultyUpstream, outbox_env: dict[str, str]
) -> None:
    upstream.set_fault(Fault.ERROR_503, "events")
    env = worker_env(upstream, outbox_env)
    first = Worker(env)
    try:
        await first.ready()
        sent = sum([await first.visit(f"user-{n}") for n in range(50)])
        assert sent == 500
        await wait_until(
            lambda: upstream.calls("events") >= 3, message="the worker to retry the outage"
        )
        first.proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: a crash
        first.proc.wait(10)
    finally:
        await first.close()
    assert upstream.accepted_uuids == Counter()

    second = Worker(env)
    try:
        await second.ready()
        upstream.set_fault(Fault.OK, "events")  # the outage ends
        await wait_until(
            lambda: len(upstream.accepted_uuids) >= 500,
            timeout=30,
            message="every event of the killed worker",
        )
        stats = await second.stats()
        deadline = time.monotonic() + 10
        while stats["sent"] < 500 and time.monotonic() < deadline:  # its last answer is read
            await asyncio.sleep(0.05)
            stats = await second.stats()
    finally:
        await second.close()
    accepted = upstream.accepted_uuids
    assert len(accepted) == 500 and set(accepted.values()) == {1}
    assert set(upstream.attempted_uuids) <= set(accepted)
    assert stats["sent"] == 500
    assert sum(v for k, v in stats.items() if k.startswith("dropped_")) == 0


async def test_sigterm_with_a_slow_events_api_loses_nothing(
    upstream: FaultyUpstream, outbox_env: dict[str, str]
) -> None:
    """Regression: SIGTERM with 300 accepted events while the events API took 8 s a call
    lost all 300 ("not delivered before shutdown (deadline 5.0s)")."""
    upstream.slow_delay = 8.0
    upstream.set_fault(Fault.SLOW, "events")
    env = worker_env(upstream, outbox_env, PM_OB_READ_TIMEOUT="10")
    first = Worker(env)
    try:
        await first.ready()
        sent = sum([await first.visit(f"visitor-{n}") for n in range(30)])
        assert sent == 300
        await wait_until(lambda: upstream.calls("events") >= 1, message="a slow call")
        started = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown (lifespan included) is done
        assert first.proc.wait(20) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 10  # the 5 s shutdown deadline, not 8 s calls
        log = first.stderr()
    finally:
        await first.close()
    assert "stay in the outbox for the next process" in log
    assert "not delivered before shutdown (deadline" not in log
    assert upstream.accepted_uuids == Counter()  # the slow call was cut short

    upstream.set_fault(Fault.OK, "events")
    second = Worker(env)
    try:
        await second.ready()
        await wait_until(
            lambda: len(upstream.accepted_uuids) >= 300,
            timeout=30,
            message="the events the stopped worker left",
        )
    finally:
        await second.close()
    accepted = upstream.accepted_uuids
    assert len(accepted) == 300 and set(accepted.values()) == {1}


@pytest.mark.parametrize("outbox", ["memory", "redis"])
async def test_one_bots_flood_with_a_slow_api_costs_real_visitors_nothing(
    upstream: FaultyUpstream, outbox: str
) -> None:
    """Regression: a bot's ~3,500 events and 20 real visitors' went out as one 1.43 MB
    call while the events API was slow; the API answered 413 and 3,440 events, the
    visitors' included, were dropped."""
    limit = 512 * 1024  # the stand-in refuses larger bodies with 413, as the API does
    upstream.events_body_limit = limit
    upstream.slow_delay = 1.0
    upstream.set_fault(Fault.SLOW, "events")
    workspace = new_workspace()
    env = {"PM_OB_WORKSPACE": workspace, "PM_OB_OUTBOX": outbox}
    if outbox == "redis":
        require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
        env["PM_OB_REDIS_URL"] = REDIS_URL
    worker = Worker(worker_env(upstream, env))
    try:
        await worker.ready()
        bot = asyncio.gather(*(worker.visit("bot") for _ in range(350)))  # 3,500 events
        visitors = [f"visitor-{n}" for n in range(20)]
        for user in visitors:
            await worker.visit(user)
        await bot

        def all_visitors_delivered() -> bool:
            counts = accepted_by_customer(upstream)
            return all(counts[user] == EVENTS_PER_VISIT for user in visitors)

        await wait_until(all_visitors_delivered, timeout=60, message="every visitor's events")
        stats = await worker.stats()
    finally:
        await worker.close()
        if outbox == "redis":
            delete_workspace(workspace)
    sizes = [call.size for call in upstream.requests("events")]
    assert max(sizes) <= limit  # no call over the limit, so no 413
    assert stats["dropped_rejected"] == stats["dropped_failed"] == 0
    assert stats["dropped_flood"] > 0  # the bot's share was capped, and counted


async def test_a_live_process_takes_over_what_a_killed_one_held(upstream: FaultyUpstream) -> None:
    """Redis: no restart needed. Two workers share the stream; the one that accepted the
    events is killed; the other claims them (XAUTOCLAIM, after claim_timeout) and delivers
    each exactly once when the outage ends."""
    require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
    workspace = new_workspace()
    env = worker_env(
        upstream,
        {
            "PM_OB_WORKSPACE": workspace,
            "PM_OB_REDIS_URL": REDIS_URL,
            "PM_OB_OUTBOX": "redis",
            "PM_OB_CLAIM_TIMEOUT": "2",
        },
    )
    upstream.set_fault(Fault.ERROR_503, "events")
    doomed, survivor = Worker(env), Worker(env)
    try:
        await doomed.ready()
        await survivor.ready()
        assert sum([await doomed.visit(f"user-{n}") for n in range(50)]) == 500
        await wait_until(lambda: upstream.calls("events") >= 4, message="retries")
        # The doomed worker holds entries of the stream (it read them, it retries them).
        held = await asyncio.to_thread(pending_by_consumer, workspace)
        doomed_pid = (await doomed.stats())["pid"]
        assert any(f":{doomed_pid}:" in name and n > 0 for name, n in held.items()), held
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        upstream.set_fault(Fault.OK, "events")
        await wait_until(
            lambda: len(upstream.accepted_uuids) >= 500,
            timeout=30,
            message="the killed worker's events, delivered by the other",
        )
    finally:
        await doomed.close()
        await survivor.close()
        delete_workspace(workspace)
    accepted = upstream.accepted_uuids
    assert len(accepted) == 500 and set(accepted.values()) == {1}
