"""``SQLiteOutbox``: the event outbox in a local SQLite file (standard library only).

Every call runs on one writer thread of its own (never on the event loop); puts that
arrive while a write is under way are committed together (group commit), so a burst of
beacons costs one transaction, not one each. WAL mode with ``synchronous=NORMAL``: a
committed put survives the process being killed (SIGKILL, OOM); ``synchronous="FULL"``
also survives the machine losing power, at the cost of an fsync per commit.

::

    events(id, customer_id, action JSON, size, enqueued_at, owner, lease_until)

``take`` leases rows to this process (``owner`` = host:pid:random, ``lease_until`` =
now + ``lease_timeout``), renewed every third of that while held. A process that
restarts on the same file finds the rows of its dead predecessor: leases whose owner
process no longer exists on this host are freed at once, any other expires. Several
processes (``uvicorn --workers``) may share one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from typing import Literal, TypeVar

from .._config import positive_int, positive_number
from .._exceptions import ConfigurationError, OutboxUnavailableError
from .._fork import abandon
from .._interfaces import OutboxEntry, PutResult
from .._models import EventAction
from ._outbox import DEFAULT_MAX_DURABLE_QUEUE, DEFAULT_MAX_PER_VISITOR, GroupCommit, Put

__all__ = ["DEFAULT_LEASE_TIMEOUT", "SQLiteOutbox"]

logger = logging.getLogger("personalize_middleware.events")

#: A lease not renewed for this long is free again (the holder died or hangs).
DEFAULT_LEASE_TIMEOUT = 60.0
_BUSY_TIMEOUT_MS = 5_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id TEXT NOT NULL,
    action TEXT NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_customer ON events (customer_id);
CREATE TABLE IF NOT EXISTS outbox_meta (one INTEGER PRIMARY KEY CHECK (one = 1), total INTEGER);
INSERT OR IGNORE INTO outbox_meta VALUES (1, (SELECT COUNT(*) FROM events));
CREATE TRIGGER IF NOT EXISTS events_added AFTER INSERT ON events
    BEGIN UPDATE outbox_meta SET total = total + 1; END;
CREATE TRIGGER IF NOT EXISTS events_removed AFTER DELETE ON events
    BEGIN UPDATE outbox_meta SET total = total - 1; END;
"""

_T = TypeVar("_T")


class SQLiteOutbox:
    """A durable outbox in the SQLite file at ``path`` (created if missing).

    ``max_queue`` actions at most, ``max_per_visitor`` per visitor; ``lease_timeout``
    bounds how long another process waits for the rows of one that hangs.
    """

    durable = True

    def __init__(
        self,
        path: str | PathLike[str],
        *,
        max_queue: int = DEFAULT_MAX_DURABLE_QUEUE,
        max_per_visitor: int = DEFAULT_MAX_PER_VISITOR,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        self.path = os.fspath(path)
        if not self.path:
            raise ConfigurationError("the outbox path is empty", field="events_outbox")
        positive_int("max_queue", max_queue)
        positive_int("max_per_visitor", max_per_visitor)
        positive_number("lease_timeout", lease_timeout)
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigurationError("synchronous must be NORMAL or FULL", field="synchronous")
        self.max_queue = max_queue
        self.max_per_visitor = max_per_visitor
        self.lease_timeout = float(lease_timeout)
        self.synchronous = synchronous
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._pending = 0
        self._con: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._commits = GroupCommit(self._write)
        self._renewer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"SQLiteOutbox({self.path!r}, pending={self._pending})"

    @property
    def pending(self) -> int:
        return self._pending

    # -- lifecycle ---------------------------------------------------------------------------

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's writer thread does not exist here and its
        connection must not be used; ``start()`` opens this process's own."""
        abandon((self._executor, self._renewer))
        self._executor = None
        self._renewer = None

    async def start(self) -> None:
        """Open (or create) the file; frees the leases of dead processes on this host."""
        if self._executor is not None:
            return
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="personalize-outbox")
        try:
            await self._run(self._open)
        except sqlite3.Error as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise ConfigurationError(
                f"cannot open the event outbox {self.path!r}: {exc}", field="events_outbox"
            ) from exc
        self._renewer = asyncio.create_task(self._renew_leases(), name="personalize-outbox-lease")

    async def aclose(self) -> None:
        if self._executor is None:
            return
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        await self._commits.wait()
        executor, self._executor = self._executor, None
        with contextlib.suppress(sqlite3.Error):
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
        executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._executor is None:
            raise OutboxUnavailableError("the event outbox is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _call(self, what: str, fn: Callable[..., _T], *args: object) -> _T:
        try:
            return await self._run(fn, *args)
        except sqlite3.Error as exc:
            raise OutboxUnavailableError(f"event outbox {what} failed: {exc}") from exc

    # -- the protocol ------------------------------------------------------------------------

    async def put(self, items: Sequence[tuple[str, EventAction]], now: float) -> PutResult:
        """Store ``items``; returns once they are committed (with every put that arrived
        meanwhile: one transaction for all)."""
        if self._executor is None:
            raise OutboxUnavailableError("the event outbox is not open")
        return await self._commits.put(items, now)

    async def _write(self, puts: list[Put]) -> list[PutResult]:
        return await self._call("write", self._insert, puts)

    async def take(self, limit: int) -> list[OutboxEntry]:
        return await self._call("take", self._take, limit)

    async def ack(self, entries: Sequence[OutboxEntry]) -> None:
        if entries:
            await self._call("ack", self._delete, [int(e.key) for e in entries])

    async def release(self, entries: Sequence[OutboxEntry]) -> None:
        if entries:
            await self._call("release", self._release, [int(e.key) for e in entries])

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_timeout / 3)
            try:
                await self._call("lease renewal", self._renew)
            except OutboxUnavailableError as exc:
                logger.warning("personalize: %s", exc)

    # -- on the outbox's thread ----------------------------------------------------------------

    def _open(self) -> None:
        con = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA synchronous={self.synchronous}")
            con.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            con.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        except BaseException:
            con.close()
            raise
        self._con = con
        self._free_dead_leases()

    def _close(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            con.close()

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            raise sqlite3.OperationalError("not open")
        return self._con

    def _insert(self, puts: list[Put]) -> list[PutResult]:
        con = self._connection()
        results = []
        with _transaction(con):
            total = con.execute("SELECT total FROM outbox_meta").fetchone()[0]
            counts: dict[str, int] = {}
            for items, now in puts:
                result = PutResult()
                for customer_id, action in items:
                    if total >= self.max_queue:
                        result.full += 1
                        continue
                    count = counts.get(customer_id)
                    if count is None:
                        count = con.execute(
                            "SELECT COUNT(*) FROM events WHERE customer_id = ?", (customer_id,)
                        ).fetchone()[0]
                    if count >= self.max_per_visitor:
                        result.flood += 1
                        continue
                    text = json.dumps(action, separators=(",", ":"), ensure_ascii=False)
                    con.execute(
                        "INSERT INTO events (customer_id, action, size, enqueued_at)"
                        " VALUES (?, ?, ?, ?)",
                        (customer_id, text, len(text.encode()), now),
                    )
                    counts[customer_id] = count + 1
                    total += 1
                    result.stored += 1
                results.append(result)
        self._pending = total
        return results

    def _take(self, limit: int) -> list[OutboxEntry]:
        con = self._connection()
        now = time.time()
        with _transaction(con):
            rows = con.execute(
                "SELECT id, customer_id, action, size, enqueued_at FROM events"
                " WHERE lease_until < ? ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            until = now + self.lease_timeout
            con.executemany(
                "UPDATE events SET owner = ?, lease_until = ? WHERE id = ?",
                [(self.owner, until, row[0]) for row in rows],
            )
            self._pending = con.execute("SELECT total FROM outbox_meta").fetchone()[0]
        entries = []
        for row_id, customer_id, text, size, enqueued_at in rows:
            try:
                action = json.loads(text)
            except ValueError:
                action = None
            if not isinstance(action, dict):
                self._delete([row_id])  # not ours to deliver: a corrupt row
                continue
            entries.append(OutboxEntry(str(row_id), customer_id, action, size, enqueued_at))  # type: ignore[arg-type]
        return entries

    def _delete(self, ids: list[int]) -> None:
        con = self._connection()
        with _transaction(con):
            con.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in ids])
            self._pending = con.execute("SELECT total FROM outbox_meta").fetchone()[0]

    def _release(self, ids: list[int]) -> None:
        con = self._connection()
        with _transaction(con):
            con.executemany(
                "UPDATE events SET owner = NULL, lease_until = 0 WHERE id = ? AND owner = ?",
                [(i, self.owner) for i in ids],
            )

    def _renew(self) -> None:
        con = self._connection()
        with _transaction(con):
            con.execute(
                "UPDATE events SET lease_until = ? WHERE owner = ? AND lease_until > 0",
                (time.time() + self.lease_timeout, self.owner),
            )
        self._free_dead_leases()

    def _free_dead_leases(self) -> None:
        """Free at once the rows leased by processes of this host that no longer run."""
        con = self._connection()
        owners = [
            row[0]
            for row in con.execute(
                "SELECT DISTINCT owner FROM events WHERE lease_until >= ? AND owner IS NOT NULL",
                (time.time(),),
            )
        ]
        dead = [owner for owner in owners if owner != self.owner and _is_dead(owner)]
        if not dead:
            return
        with _transaction(con):
            for owner in dead:
                con.execute(
                    "UPDATE events SET owner = NULL, lease_until = 0 WHERE owner = ?", (owner,)
                )
        logger.info(
            "personalize: took over the event outbox rows of %d stopped process(es)", len(dead)
        )


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    if con.in_transaction:
        yield
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _is_dead(owner: str) -> bool:
    """True when ``owner`` (host:pid:token) was a process of this host that is gone."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or os.name != "posix":
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return True  # our pid, another token: a previous life of this process id (containers)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists (another user's process)
    return False
