"""``redis+sentinel://``: the layer finds the primary through a real Sentinel (a
``redis-server --sentinel`` of the test's own watching a private primary)."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from personalize_middleware import Identity
from tests.conftest import require_tool
from tests.support.http_server import run_asgi_server
from tests.support.redis_standin import Standin
from tests.support.redis_stores import KEYS, customer, layer_of, open_store, query
from tests.support.redis_support import (
    PrivateRedis,
    _free_port,
    new_workspace,
    redis_server_binary,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def sentinel_url() -> Iterator[str]:
    binary = redis_server_binary()
    require_tool(binary is not None, "redis-server (to start a primary and a Sentinel)")
    assert binary is not None
    primary = PrivateRedis(binary)
    primary.start()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="pm-sentinel-") as directory:
        config = Path(directory) / "sentinel.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor pm-primary 127.0.0.1 {primary.port} 1\n"
        )
        proc = subprocess.Popen(
            [binary, str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
            deadline = time.monotonic() + 20
            while True:  # the Sentinel answers and knows the primary
                try:
                    if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "pm-primary"):
                        break
                except (redis.RedisError, OSError):
                    pass
                assert time.monotonic() < deadline, "the Sentinel did not start"
                time.sleep(0.05)
            client.close()
            yield f"redis+sentinel://127.0.0.1:{port}/pm-primary"
        finally:
            proc.kill()
            proc.wait(10)
            primary.stop()


@pytest.mark.anyio
async def test_the_layer_works_through_a_sentinel(sentinel_url: str) -> None:
    stand = Standin()
    with run_asgi_server(stand.app) as base_url:
        ws = new_workspace()
        user = customer()
        options = {"url": sentinel_url, "op_timeout": 1.0}
        async with (
            open_store(base_url, ws, **options) as a,
            open_store(base_url, ws, **options) as b,
        ):
            assert set(await a.get(query(user), KEYS)) == set(KEYS)
            assert set(await b.get(query(user), KEYS)) == set(KEYS)  # from L2
            assert stand.calls_for(user) == 1
            await b.invalidate(Identity(customer_id=user))
            assert set(await a.get(query(user, DAY="Friday"), KEYS)) == set(KEYS)
            assert stand.calls_for(user) == 2
            assert layer_of(a).stats.l2_errors == 0 and not layer_of(a).is_degraded
