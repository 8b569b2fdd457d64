"""End to end: ``uvicorn --workers 4`` serving PersonalizeMiddleware with ``redis_url`` set,
against the stand-in MoEngage over HTTP and a private redis-server that is killed and
restarted mid-test."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require_tool
from tests.support.http_server import run_asgi_server
from tests.support.redis_standin import Rule, Standin
from tests.support.redis_stores import customer
from tests.support.redis_support import PrivateRedis, new_workspace, redis_server_binary

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 4


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    binary = redis_server_binary()
    require_tool(binary is not None, "redis-server (to start a private Redis)")
    assert binary is not None
    private = PrivateRedis(binary)
    private.start()
    yield private
    private.stop()


def fresh_client(**kw: Any) -> httpx.AsyncClient:
    """No keep-alive: every request is a new connection, so the kernel hands them to
    whichever worker process accepts first and they spread over all of them."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=500, max_keepalive_connections=0),
        timeout=20.0,
        **kw,
    )


async def page(client: httpx.AsyncClient, user: str) -> dict[str, Any]:
    response = await client.get("/", headers={"X-User": user})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def serve_with_workers(
    standin_url: str, redis_url: str
) -> tuple[subprocess.Popen[bytes], str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PM_E2E_BASE_URL": standin_url,
        "PM_E2E_REDIS_URL": redis_url,
        "PM_E2E_WORKSPACE": new_workspace(),
    }
    args = ["--fd", str(sock.fileno()), "--workers", str(WORKERS), "--log-level", "warning"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.support.redis_e2e_app:app", *args],
        cwd=ROOT,
        env=env,
        pass_fds=[sock.fileno()],
    )
    sock.close()  # the workers hold it now
    base = f"http://127.0.0.1:{port}"
    # Ready when every worker has answered: each page names its process.
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    async with fresh_client(base_url=base) as client:
        while len(pids) < WORKERS:
            assert proc.poll() is None, "uvicorn exited"
            assert time.monotonic() < deadline, f"only {len(pids)} workers answered"
            try:
                pids.add((await client.get("/healthz")).json()["pid"])
            except httpx.TransportError:
                await asyncio.sleep(0.05)  # not listening yet
    return proc, base


async def worker_stats(client: httpx.AsyncClient) -> dict[int, dict[str, int]]:
    """Each worker's Redis counters (for a failure message)."""
    stats: dict[int, dict[str, int]] = {}
    for _ in range(200):
        data = (await client.get("/healthz")).json()
        stats[data["pid"]] = data["redis"]
        if len(stats) == WORKERS:
            break
    return stats


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def test_four_workers_share_one_fetch_and_survive_redis_dying(
    server: PrivateRedis,
) -> None:
    standin = Standin()
    with run_asgi_server(standin.app) as standin_url:
        proc, base = await serve_with_workers(standin_url, server.url)
        try:
            async with fresh_client(base_url=base) as client:
                # 200 concurrent cold requests of one user over 4 processes: 1 fetch.
                user = customer()
                standin.rules[user] = Rule(delay=0.3)  # upstream latency: all overlap
                pages = await asyncio.gather(*(page(client, user) for _ in range(200)))
                assert standin.calls_for(user) == 1, await worker_stats(client)
                assert all(p["title"] == f"hello {user}" for p in pages)
                assert len({p["pid"] for p in pages}) == WORKERS

                # Redis killed: every page still 200 and personalized (each process on
                # its own now).
                server.stop()
                users = [customer() for _ in range(5)]
                pages = await asyncio.gather(*(page(client, u) for u in users for _ in range(20)))
                assert all(p["title"].startswith("hello cust-") for p in pages)
                assert all(standin.calls_for(u) >= 1 for u in users)

                # Redis back: sharing resumes by itself (each worker retries after its
                # short backoff): a new user seen by several workers is fetched once.
                server.start()
                deadline = time.monotonic() + 20
                while True:
                    user = customer()
                    seen = [await page(client, user) for _ in range(12)]
                    if standin.calls_for(user) == 1 and len({p["pid"] for p in seen}) > 1:
                        break
                    assert time.monotonic() < deadline, "sharing did not resume"
        finally:
            stop(proc)
        assert proc.returncode == 0 or proc.returncode == -signal.SIGINT
