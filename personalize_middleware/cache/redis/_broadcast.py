"""Messages between the processes of a workspace: invalidations and refreshes.

One pub/sub channel per workspace (``KeyNames.channel``) carries JSON messages::

    {"kind": "invalidate", "id": <identity digest>, "from": <process>}
    {"kind": "refresh", "keys": [...] | null, "v": <version>, "from": <process>}

An invalidation is published by the same Lua script that starts the identity's new
generation; receivers drop their L1 copies. A refresh (the metadata watcher saw a status
change, ``personalize-middleware refresh``, ``PersonalizeMiddleware.refresh``) also bumps
``KeyNames.version``: pub/sub delivers nothing to a process that is reconnecting, so each
process also reads the version every ``poll_interval`` seconds and, when it moved without
a message, refreshes all the same. With Redis a refresh therefore reaches every process
within ~ms (pub/sub) and at worst ``poll_interval`` (+ one metadata call).

Listeners run on the event loop and must not block; a failing listener is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

from ..._exceptions import PersonalizeError
from ..._fork import abandon
from ..._logging import RateLimitedLog
from ._connection import RedisConnection, Unavailable, mask_url
from ._keys import KeyNames

__all__ = ["DEFAULT_POLL_INTERVAL", "Broadcast", "Listener"]

logger = logging.getLogger("personalize_middleware.redis")

DEFAULT_POLL_INTERVAL = 5.0
_RECONNECT_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)
_MAX_MESSAGE_BYTES = 64 * 1024

Listener = Callable[[Mapping[str, Any]], None]


class Broadcast:
    """Publishes to, and listens on, the workspace's channel."""

    def __init__(
        self,
        conn: RedisConnection,
        names: KeyNames,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self._conn = conn
        self._names = names
        self.poll_interval = poll_interval
        self.process_id = secrets.token_hex(8)
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._version: int | None = None
        self.received = 0
        self.missed = 0
        self._log = RateLimitedLog(logger)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def message(self, kind: str, **fields: Any) -> str:
        return json.dumps({"kind": kind, "from": self.process_id, **fields})

    async def publish_refresh(self, keys: list[str] | None = None, *, strict: bool = False) -> int:
        """Tell every process to refresh (``keys``: their content changed, forget them
        too). Returns how many processes were listening (0 when Redis is unusable, or
        ``strict``: a ``PersonalizeError``)."""
        names = self._names

        async def send(client: Any) -> Any:
            version = await client.incr(names.version)
            return await client.publish(
                names.channel, self.message("refresh", keys=keys, v=version)
            )

        try:
            return int(await self._conn.run("broadcast", send))
        except Unavailable as exc:
            if strict:
                raise PersonalizeError(
                    f"Redis at {mask_url(self._conn.url)} did not take the refresh"
                ) from exc
            return 0

    # -- listening -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and self._listeners:
            self._task = asyncio.get_running_loop().create_task(
                self._listen(), name="personalize-redis-broadcast"
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # redis-py's get_message can swallow a cancellation while it reads: closing the
            # subscription ends that read, and the wait is bounded whatever happens.
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done:
                await self._drop_subscription()
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=2.0)
            if done:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    task.result()
        await self._drop_subscription()

    def reset_after_fork(self) -> None:
        abandon((self._task, self._pubsub))  # the parent's loop's: never runs here
        self._task = self._pubsub = None
        self._version = None
        self.process_id = secrets.token_hex(8)

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                client = self._conn.client()
                self._pubsub = pubsub = client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self._names.channel)
                await self._poll_version()
                failures = 0
                await self._pump(pubsub)
            except asyncio.CancelledError:
                raise  # aclose() closes the subscription once this task is done
            except Unavailable:
                pass  # an outage: the connection logs it
            except Exception as exc:  # Redis went away: listen again after a pause
                self._log.warning(
                    "broadcast", "personalize: Redis broadcast channel lost (%s); retrying", exc
                )
            await self._drop_subscription()
            await asyncio.sleep(_RECONNECT_DELAYS[min(failures, len(_RECONNECT_DELAYS) - 1)])
            failures += 1

    async def _drop_subscription(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()

    async def _pump(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.poll_interval
        while True:
            wait = max(0.0, next_poll - loop.time())
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if message is not None and message.get("type") == "message":
                self._deliver(message.get("data"))
            if loop.time() >= next_poll:
                await self._poll_version()
                next_poll = loop.time() + self.poll_interval

    async def _poll_version(self) -> None:
        """A refresh this process did not hear about (it was reconnecting): refresh."""
        try:
            raw = await self._conn.run("version", lambda c: c.get(self._names.version))
        except Unavailable:
            return
        version = _as_int(raw)
        known, self._version = self._version, max(version, self._version or 0)
        if known is not None and version > known:
            self.missed += 1
            self._dispatch({"kind": "refresh", "keys": None, "v": version, "from": None})

    def _deliver(self, data: Any) -> None:
        if not isinstance(data, bytes | str) or len(data) > _MAX_MESSAGE_BYTES:
            return
        try:
            message = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        version = message.get("v")
        if isinstance(version, int) and not isinstance(version, bool):
            self._version = max(version, self._version or 0)
        if message.get("from") == self.process_id:
            return  # our own: already applied here
        self.received += 1
        self._dispatch(message)

    def _dispatch(self, message: Mapping[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:
                logger.exception("personalize: a broadcast listener failed")


def _as_int(raw: Any) -> int:
    """The version counter's value (0 when absent or not a counter)."""
    try:
        return max(0, int(raw)) if raw is not None else 0
    except (TypeError, ValueError):
        return 0
