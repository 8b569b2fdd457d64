"""``RedisOutbox``: the event outbox as a Redis stream per workspace, with a consumer group.

::

    pm:v1:{ws}:ev      stream  one entry per action: e = {"c": customer id, "t": stored at,
                               "a": the action as it is sent}
    pm:v1:{ws}:ev:n    hash    visitor digest -> actions waiting (the per-visitor bound)

Every process puts (a Lua script: the size bounds and the XADD in one step) and every
process delivers: ``XREADGROUP`` hands each entry to one process (consumer ``host:pid:
random``), which acknowledges it (``XACK`` + ``XDEL``, one script) only after MoEngage
accepted it. While it holds entries it renews them (``XCLAIM ... JUSTID`` resets their
idle time) every third of ``claim_timeout``; the entries of a process that died stop being
renewed, and after ``claim_timeout`` another process takes them over with ``XAUTOCLAIM``.
A process shutting down hands its entries back at once (``XCLAIM`` to ``released`` with an
idle time past the timeout). Redeliveries carry the same ``moe_event_uuid``: MoEngage
deduplicates them.

Redis must keep the stream: ``maxmemory-policy`` ``noeviction`` or ``volatile-*`` (an
``allkeys-*`` policy may evict it: a warning is logged at start), and persistence
(``appendonly yes``) if the outbox must survive a restart of Redis itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

from .._config import positive_int, positive_number
from .._exceptions import ConfigurationError, OutboxUnavailableError
from .._fork import abandon
from .._interfaces import OutboxEntry, PutResult
from .._models import EventAction
from ..cache.redis import RedisConnection, RedisStats, Unavailable, import_redis, mask_url
from ._outbox import (
    DEFAULT_MAX_DURABLE_QUEUE,
    DEFAULT_MAX_PER_VISITOR,
    GroupCommit,
    Put,
    decode_entry,
    encode_entry,
)
from ._outbox_lua import ACK_SCRIPT, PUT_SCRIPT, READ_SCRIPT

__all__ = ["DEFAULT_CLAIM_TIMEOUT", "RedisOutbox"]

logger = logging.getLogger("personalize_middleware.events")

#: Entries held by a process that stopped renewing them are taken over after this.
DEFAULT_CLAIM_TIMEOUT = 60.0
DEFAULT_OUTBOX_OP_TIMEOUT = 1.0
GROUP = "pm-events"
RELEASED = "released"
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
_CHUNK = 1_000
_IDLE_CONSUMER_MS = 3_600_000  # consumers idle this long with nothing pending are removed
_COUNTS_TTL_MS = 86_400_000  # the per-visitor counts outlive any entry they count


def visitor_digest(customer_id: str) -> str:
    return hashlib.sha256(customer_id.encode()).hexdigest()[:24]


class RedisOutbox:
    """A durable outbox shared by every process of a workspace (see the module doc).

    ``max_queue`` entries at most in the stream, ``max_per_visitor`` per visitor;
    ``claim_timeout`` is how long the entries of a process that stopped wait before
    another takes them over; ``op_timeout`` bounds each Redis call (a beacon waits for its
    write at most this long, then is answered 503).
    """

    durable = True

    def __init__(
        self,
        url: str,
        *,
        workspace_id: str,
        namespace: str = "pm",
        max_queue: int = DEFAULT_MAX_DURABLE_QUEUE,
        max_per_visitor: int = DEFAULT_MAX_PER_VISITOR,
        claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
        op_timeout: float = DEFAULT_OUTBOX_OP_TIMEOUT,
    ) -> None:
        for name, value in (("workspace_id", workspace_id), ("namespace", namespace)):
            if not isinstance(value, str) or not _NAME_RE.match(value):
                raise ConfigurationError(f"{name} must be letters, digits, '_' or '-'", field=name)
        positive_int("max_queue", max_queue)
        positive_int("max_per_visitor", max_per_visitor)
        positive_number("claim_timeout", claim_timeout)
        positive_number("op_timeout", op_timeout)
        self.url = url
        prefix = f"{namespace}:v1:{{{workspace_id}}}:"
        self.stream_key = prefix + "ev"
        self.counts_key = prefix + "ev:n"
        self.max_queue = max_queue
        self.max_per_visitor = max_per_visitor
        self.claim_timeout = float(claim_timeout)
        self.op_timeout = float(op_timeout)
        self.consumer = ""
        self.claimed = 0  # entries taken over from processes that stopped
        self._pending = 0
        self._leased: dict[str, None] = {}
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        self._claims = 0
        self._scripts: dict[str, Any] = {}
        self._conn = self._connection()  # fails here if the redis package is missing
        self._refused: type[Exception] = import_redis().ResponseError
        self._renewer: asyncio.Task[None] | None = None
        self._commits = GroupCommit(self._write)

    def __repr__(self) -> str:
        return f"RedisOutbox({mask_url(self.url)!r}, stream={self.stream_key!r})"

    @property
    def pending(self) -> int:
        return self._pending

    def _connection(self) -> RedisConnection:
        return RedisConnection(
            self.url,
            stats=RedisStats(),
            op_timeout=self.op_timeout,
            stall_tolerance=self.op_timeout * 2,
            on_connect=self._connected,
            meanwhile="beacons are answered 503 and event delivery waits",
        )

    def _connected(self, client: Any) -> None:
        self._scripts = {
            "put": client.register_script(PUT_SCRIPT),
            "ack": client.register_script(ACK_SCRIPT),
            "read": client.register_script(READ_SCRIPT),
        }

    async def _run(self, what: str, op: Any) -> Any:
        try:
            return await self._conn.run(what, op)
        except Unavailable as exc:
            raise OutboxUnavailableError(
                f"Redis unavailable for the event outbox ({what})"
            ) from exc

    # -- lifecycle ---------------------------------------------------------------------------

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's connection and lease renewer stay the parent's;
        ``start()`` makes this process's own (and its own consumer name)."""
        abandon((self._conn, self._renewer))
        self._renewer = None
        self._conn = self._connection()

    async def start(self) -> None:
        """Create the consumer group (if Redis answers: else on first use)."""
        if self._renewer is not None:
            return
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._conn = self._connection()
        self._next_claim = 0.0  # take over what stopped processes left, right away
        try:
            await self._run("outbox start", self._create_group)
            policy = await self._run("outbox start", _eviction_policy)
        except OutboxUnavailableError as exc:
            logger.warning("personalize: %s; the outbox is used once Redis answers", exc)
        else:
            if policy.startswith("allkeys"):
                logger.warning(
                    "personalize: Redis maxmemory-policy is %s: under memory pressure it may "
                    "evict the event outbox; use noeviction or a volatile-* policy",
                    policy,
                )
        self._renewer = asyncio.create_task(self._renew_leases(), name="personalize-outbox-lease")

    async def aclose(self) -> None:
        await self._commits.wait()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        self._leased.clear()
        await self._conn.aclose()

    async def _create_group(self, client: Any) -> None:
        try:
            await client.xgroup_create(self.stream_key, GROUP, id="0", mkstream=True)
        except self._refused as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- the protocol ------------------------------------------------------------------------

    async def put(self, items: Sequence[tuple[str, EventAction]], now: float) -> PutResult:
        """Store ``items`` (with the puts that arrive meanwhile: one script call for all)."""
        return await self._commits.put(items, now)

    async def _write(self, puts: list[Put]) -> list[PutResult]:
        args: list[Any] = [self.max_queue, self.max_per_visitor, _COUNTS_TTL_MS]
        for items, now in puts:
            for customer_id, action in items:
                args += (visitor_digest(customer_id), encode_entry(customer_id, action, now)[0])
        keys = [self.stream_key, self.counts_key]
        length, answer = await self._run(
            "outbox put", lambda c: self._scripts["put"](keys=keys, args=args)
        )
        self._pending = int(length)
        codes = answer.decode() if isinstance(answer, bytes) else str(answer)
        results = []
        position = 0
        for items, _ in puts:
            result = PutResult()
            for code in codes[position : position + len(items)]:
                if code == "0":
                    result.stored += 1
                elif code == "1":
                    result.full += 1
                else:
                    result.flood += 1
            position += len(items)
            results.append(result)
        return results

    async def take(self, limit: int) -> list[OutboxEntry]:
        raw, length = await self._run("outbox take", lambda c: self._read(c, limit))
        self._pending = length
        entries: list[OutboxEntry] = []
        broken: list[OutboxEntry] = []
        for entry_id, fields in raw:
            key = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            payload = (fields or {}).get(b"e")
            entry = None if payload is None else decode_entry(key, payload)
            if entry is None:
                broken.append(OutboxEntry(key, "", {}, 0, 0.0))  # type: ignore[typeddict-item]
                continue
            self._leased[key] = None
            entries.append(entry)
        if broken:
            logger.warning(
                "personalize: %d unreadable entries removed from the outbox", len(broken)
            )
            await self.ack(broken)
        return entries

    async def _read(self, client: Any, limit: int) -> tuple[list[Any], int]:
        found: list[Any] = []
        if time.monotonic() >= self._next_claim:
            found += await self._claim(client, limit)
        if len(found) >= limit:
            return found, int(await client.xlen(self.stream_key))
        args = [GROUP, self.consumer, limit - len(found)]
        try:
            length, lines = await self._scripts["read"](keys=[self.stream_key], args=args)
        except self._refused as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._create_group(client)  # the stream was deleted (FLUSHALL)
            length, lines = await self._scripts["read"](keys=[self.stream_key], args=args)
        for line in lines.split(b"\n") if lines else ():
            entry_id, _, entry = line.partition(b" ")
            found.append((entry_id, {b"e": entry} if entry else None))
        return found, int(length)

    async def _claim(self, client: Any, limit: int) -> list[Any]:
        """Entries idle for ``claim_timeout``: their holder stopped renewing them."""
        self._next_claim = time.monotonic() + self.claim_timeout / 2
        min_idle = int(self.claim_timeout * 1000)
        try:
            answer = await client.xautoclaim(
                self.stream_key, GROUP, self.consumer, min_idle, self._claim_cursor, count=limit
            )
        except self._refused as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._create_group(client)
            return []
        cursor = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        self._claim_cursor = cursor
        if cursor != "0-0":
            self._next_claim = 0.0  # more to look at: go on next time
        claimed = [message for message in answer[1] if message and message[1]]
        if claimed:
            self.claimed += len(claimed)
            logger.info(
                "personalize: took over %d tracking events of a stopped process", len(claimed)
            )
        self._claims += 1
        if self._claims % 20 == 1:
            await self._forget_idle_consumers(client)
        return claimed

    async def _forget_idle_consumers(self, client: Any) -> None:
        for consumer in await client.xinfo_consumers(self.stream_key, GROUP):
            name = consumer.get("name")
            name = name.decode() if isinstance(name, bytes) else str(name)
            if (
                name != self.consumer
                and int(consumer.get("pending", 0)) == 0
                and int(consumer.get("idle", 0)) > _IDLE_CONSUMER_MS
            ):
                await client.xgroup_delconsumer(self.stream_key, GROUP, name)

    async def ack(self, entries: Sequence[OutboxEntry]) -> None:
        if not entries:
            return
        keys = [self.stream_key, self.counts_key]
        for start in range(0, len(entries), _CHUNK):
            chunk = entries[start : start + _CHUNK]
            args: list[Any] = [GROUP]
            for entry in chunk:
                args += (entry.key, visitor_digest(entry.customer_id))
            self._pending = int(
                await self._run(
                    "outbox ack", lambda c, a=args: self._scripts["ack"](keys=keys, args=a)
                )
            )
            for entry in chunk:
                self._leased.pop(entry.key, None)

    async def release(self, entries: Sequence[OutboxEntry]) -> None:
        """Hand entries back: idle past the timeout, so the next ``XAUTOCLAIM`` takes them."""
        ids = [entry.key for entry in entries]
        idle = int(self.claim_timeout * 1000) * 10
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            await self._run(
                "outbox release",
                lambda c, ids=chunk: c.xclaim(
                    self.stream_key, GROUP, RELEASED, 0, ids, idle=idle, justid=True
                ),
            )
            for key in chunk:
                self._leased.pop(key, None)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.claim_timeout / 3)
            ids = list(self._leased)
            try:
                for start in range(0, len(ids), _CHUNK):
                    chunk = ids[start : start + _CHUNK]
                    await self._run(
                        "outbox renewal",
                        lambda c, ids=chunk: c.xclaim(
                            self.stream_key, GROUP, self.consumer, 0, ids, justid=True
                        ),
                    )
            except OutboxUnavailableError as exc:
                logger.warning("personalize: %s", exc)


async def _eviction_policy(client: Any) -> str:
    try:
        answer = await client.config_get("maxmemory-policy")
    except Exception:  # CONFIG is often disabled on managed Redis: nothing to check then
        return ""
    value = answer.get("maxmemory-policy") or answer.get(b"maxmemory-policy") or ""
    return value.decode() if isinstance(value, bytes) else str(value)
