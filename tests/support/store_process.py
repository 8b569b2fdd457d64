"""An ExperienceStore with a RedisSharedLayer in an OS process of its own, driven line by
line: ``python -m tests.support.store_process '<json config>'``.

The parent (``StoreProcess``) sends one JSON command a line and reads one JSON answer a
line, one command at a time; ``spawn`` starts a read that runs alongside, so a slow fetch
can be in flight while the parent invalidates in another process and reads in this one::

    {"op": "get", "customer": "c1", "day": "Monday"}         -> {"titles": {key: title}}
    {"op": "spawn", "id": "slow", "customer": "c1", ...}     -> {"spawned": "slow"}
    {"op": "join", "id": "slow"}                             -> what "get" answers
    {"op": "invalidate", "customer": "c1"}                   -> {"ok": true}
    {"op": "stats"}                     -> {"store": {...}, "layer": {...}, "received": n}
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["StoreProcess"]

ROOT = Path(__file__).resolve().parents[2]
KEYS = ["hero", "banner"]


class StoreProcess:
    """The parent's handle on one store process (a context manager)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> StoreProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.store_process", json.dumps(self.config)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"store process failed to start: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        try:
            proc.communicate(timeout=15)  # EOF on stdin: the child closes its store, exits
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"store process exited ({proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def titles(self, customer: str, day: str = "Monday") -> dict[str, str]:
        titles: dict[str, str] = self.ask("get", customer=customer, day=day)["titles"]
        return titles


# -- the child ---------------------------------------------------------------------------


async def _child(config: dict[str, Any]) -> None:
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
    layer = RedisSharedLayer(config["redis_url"], workspace_id=config["workspace"])
    store = ExperienceStore(PersonalizeClient(settings), shared=layer)
    await store.start()
    spawned: dict[str, asyncio.Task[dict[str, Any]]] = {}

    async def get(command: dict[str, Any]) -> dict[str, Any]:
        query = FetchQuery(Identity(customer_id=command["customer"]), {"DAY": command["day"]})
        found = await store.get(query, KEYS, timeout=30.0)
        return {"titles": {key: exp.get("title") for key, exp in found.items()}}

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "get":
            return await get(command)
        if op == "spawn":
            spawned[command["id"]] = asyncio.create_task(get(command))
            await asyncio.sleep(0)  # let it start: its L2 read goes out now
            return {"spawned": command["id"]}
        if op == "join":
            return await spawned.pop(command["id"])
        if op == "invalidate":
            await store.invalidate(Identity(customer_id=command["customer"]))
            return {"ok": True}
        if op == "stats":
            return {
                "store": {k: v for k, v in asdict(store.stats).items() if isinstance(v, int)},
                "layer": layer.stats.as_dict(),
                "received": layer.broadcast.received,
            }
        raise ValueError(f"unknown op {op!r}")

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)

    async def answer(command: dict[str, Any]) -> None:
        try:
            reply = await handle(command)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)

    while line := await reader.readline():
        await answer(json.loads(line))  # one at a time: "spawn" starts what runs alongside
    for task in spawned.values():
        task.cancel()
    await store.aclose()
    await store.backend.aclose()


if __name__ == "__main__":
    asyncio.run(_child(json.loads(sys.argv[1])))
