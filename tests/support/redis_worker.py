"""One OS process of a multi-process Redis test: ``python -m tests.support.redis_worker
'<json config>'``.

The worker sets itself up (an ExperienceStore with a RedisSharedLayer over the stand-in,
or a bare RedisRateLimiter), prints ``ready``, waits for ``go`` on stdin (so every worker
starts its load at the same moment), runs, prints one JSON line of results and exits.
``run_workers`` is the parent's side.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_workers"]

ROOT = Path(__file__).resolve().parents[2]


def run_workers(
    configs: list[dict[str, Any]],
    *,
    timeout: float = 60.0,
    on_ready: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Start one worker per config, release them together (after ``on_ready()``, once
    every worker is set up), return their results."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.redis_worker", json.dumps(config)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for config in configs
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # blocks until the worker is set up
            if line.strip() != "ready":
                raise RuntimeError(f"worker failed to start: {line!r}")
        if on_ready is not None:
            on_ready()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"worker exited with {proc.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def _wait_for_go() -> None:
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(2)


async def _store_worker(config: dict[str, Any]) -> dict[str, Any]:
    from personalize_middleware import (
        ExperienceStore,
        Identity,
        PersonalizeClient,
        PersonalizeSettings,
        RedisSharedLayer,
    )
    from personalize_middleware._models import FetchQuery

    settings = PersonalizeSettings(
        workspace_id="WS1", api_secret="secret-x", base_url=config["base_url"]
    )
    layer = RedisSharedLayer(
        config["redis_url"], workspace_id=config["workspace"], **config["layer"]
    )
    store = ExperienceStore(PersonalizeClient(settings), shared=layer)
    await store.start()
    keys = config["keys"]

    def get(customer_id: str) -> Any:
        q = FetchQuery(Identity(customer_id=customer_id), {"DAY": "Monday"})
        return store.get(q, keys, timeout=config.get("timeout", 10.0))

    await get("warm-up-" + config["workspace"])  # connections open before the clock starts
    before = layer.stats.as_dict()
    calls_before = store.stats.upstream_calls
    await _wait_for_go()
    started = time.monotonic()
    if config["mode"] == "burst":
        results = await asyncio.gather(*(get(config["customer"]) for _ in range(config["n"])))
    else:  # "demand": a new user every 1/rate seconds, for duration seconds
        prefix = config["prefix"]
        tasks = []
        for i, at in enumerate(_send_times(config)):
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the simulated demand
            tasks.append(asyncio.create_task(get(f"{prefix}-{i}")))
        results = await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    await store.aclose()
    await store.backend.aclose()
    return {
        "served": sum(1 for r in results if set(r) == set(keys)),
        "requests": len(results),
        "elapsed": elapsed,
        "layer": {k: v - before[k] for k, v in layer.stats.as_dict().items()},
        "upstream_calls": store.stats.upstream_calls - calls_before,
    }


def _send_times(config: dict[str, Any]) -> list[float]:
    """When to ask (seconds from the start): ``rate`` a second, or ``schedule``: a list of
    ``[from_second, rate]`` steps."""
    steps = config.get("schedule") or [[0.0, config["rate"]]]
    times: list[float] = []
    at, duration = 0.0, config["duration"]
    while at < duration - 1e-9:
        rate = [r for start, r in steps if start <= at + 1e-9][-1]
        times.append(at)
        at += 1.0 / rate
    return times


async def _limiter_worker(config: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from personalize_middleware.cache.redis._limiter import RedisRateLimiter

    client = aioredis.Redis.from_url(config["redis_url"])
    prefix = f"pm:v1:{{{config['workspace']}}}:"
    limiter = RedisRateLimiter(
        client,
        key=prefix + "rl",
        pause_key=prefix + "pause",
        budget=config["budget"],
        window=config["window"],
        margin=config["margin"],
    )
    await client.ping()
    await _wait_for_go()
    grants: list[float] = []
    denied = 0
    deadline = time.monotonic() + config["duration"]

    async def hammer() -> None:
        nonlocal denied
        while time.monotonic() < deadline:
            grant = await limiter.acquire(1)
            if grant.allowed:
                grants.append(grant.server_time)
            else:
                denied += 1

    await asyncio.gather(*(hammer() for _ in range(config["concurrency"])))
    await client.aclose()
    return {"grants": grants, "denied": denied}


def main() -> None:
    config = json.loads(sys.argv[1])
    worker = _limiter_worker if config["mode"] == "limiter" else _store_worker
    print(json.dumps(asyncio.run(worker(config))), flush=True)


if __name__ == "__main__":
    main()
