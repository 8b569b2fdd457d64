"""Experience metadata: which configured keys are live, and typo detection.

The watcher refreshes every ``interval`` seconds, and at once when asked
(``request_refresh``: another process saw a change, or an operator ran
``personalize-middleware refresh``). ``on_change(keys, requested)`` hears of every key whose
status changed; the middleware then forgets their cached entries and, when this process
found the change on its own, tells the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import re
from collections.abc import Awaitable, Callable

from .._exceptions import APIError
from .._fork import abandon, register
from .._interfaces import PersonalizeBackend
from .._logging import RateLimitedLog
from .._models import EXPERIENCE_STATUSES, ExperienceMetadata

__all__ = ["DEFAULT_METADATA_REFRESH", "MetadataWatcher", "suggest_key"]

logger = logging.getLogger("personalize_middleware.metadata")

DEFAULT_METADATA_REFRESH = 300.0
_ACTIVE_MEMO_SIZE = 1024


def suggest_key(key: str, known: list[str]) -> str | None:
    """The closest known key to ``key`` ("did you mean ...?"), if any is close: a near
    spelling, else the key sharing most words with it (``home-hero`` -> ``hero-banner``)."""
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if matches:
        return matches[0]
    words = _words(key)
    scored = [
        (len(words & _words(k)), difflib.SequenceMatcher(None, key, k).ratio(), k) for k in known
    ]
    best = max(scored, default=None)
    return best[2] if best is not None and best[0] > 0 else None


def _words(key: str) -> set[str]:
    return {word for word in re.split(r"[^a-z0-9]+", key.lower()) if word}


def _known_keys(known: list[str], limit: int = 10) -> str:
    if not known:
        return "it has no experiences"
    shown = ", ".join(known[:limit]) + (", ..." if len(known) > limit else "")
    return f"known keys: {shown}"


class MetadataWatcher:
    """Fetches metadata at start-up (in the background: never blocks start-up) and every
    ``interval`` seconds. Until the first answer, every key is requested."""

    def __init__(
        self,
        backend: PersonalizeBackend,
        configured_keys: tuple[str, ...],
        *,
        interval: float = DEFAULT_METADATA_REFRESH,
        source: str = "the workspace",
    ) -> None:
        self.backend = backend
        self.source = source  # where the experiences live, for log lines
        self.configured_keys = configured_keys
        self.interval = interval
        self.statuses: dict[str, str] | None = None
        self._memo_of: dict[str, str] | None = None  # the statuses ``_memo`` was made from
        self._memo: dict[tuple[str, ...], tuple[str, ...]] = {}
        #: Called with the keys whose status changed and whether the refresh was asked
        #: for (``request_refresh``) rather than this process's own periodic one.
        self.on_change: Callable[[frozenset[str], bool], Awaitable[None]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._requested = False
        self._warned = False
        self._log = RateLimitedLog(logger, interval=3600)
        register(self)

    def active(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        """The keys worth requesting: Active ones (all of them while metadata is unknown).
        Memoised per key tuple (a route asks for the same keys on every request) until
        the statuses are replaced."""
        statuses = self.statuses
        if statuses is None:
            return keys
        if statuses is not self._memo_of:
            self._memo_of, self._memo = statuses, {}
        found = self._memo.get(keys)
        if found is None:
            if len(self._memo) >= _ACTIVE_MEMO_SIZE:  # get_many() may ask for any keys
                self._memo.clear()
            found = self._memo[keys] = tuple(k for k in keys if statuses.get(k) == "Active")
        return found

    def status(self, key: str) -> str | None:
        """``key``'s status (``Active``, ``Paused``, ``Scheduled``), ``None`` when the
        workspace has no such key (or metadata is not known yet: then ``""``)."""
        statuses = self.statuses
        return "" if statuses is None else statuses.get(key)

    async def refresh(self, *, requested: bool = False) -> list[ExperienceMetadata]:
        entries = await self.backend.fetch_metadata(EXPERIENCE_STATUSES)
        previous, self.statuses = self.statuses, {entry.key: entry.status for entry in entries}
        if not self._warned:
            self._warned = True
            self._report_unknown_keys()
        if previous is not None and self.on_change is not None:
            now = self.statuses
            changed = frozenset(
                k for k in previous.keys() | now.keys() if previous.get(k) != now.get(k)
            )
            if changed:
                logger.info(
                    "personalize: experience status changed: %s",
                    ", ".join(f"{k} {previous.get(k)} -> {now.get(k)}" for k in sorted(changed)),
                )
                await self.on_change(changed, requested)
        return entries

    def request_refresh(self) -> None:
        """Refresh now (in the watcher's task), not at the end of the interval."""
        self._requested = True
        if self._wake is not None:
            self._wake.set()

    def _report_unknown_keys(self) -> None:
        assert self.statuses is not None
        known = sorted(self.statuses)
        for key in self.configured_keys:
            status = self.statuses.get(key)
            if status is None:
                hint = suggest_key(key, known)
                logger.warning(
                    "personalize: configured experience key %r is not in %s; %s",
                    key,
                    self.source,
                    f"did you mean {hint!r}?" if hint else _known_keys(known),
                )
            elif status != "Active":
                logger.info("personalize: experience %r is %s; defaults render", key, status)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            requested, self._requested = self._requested, False
            try:
                await self.refresh(requested=requested)
            except APIError as exc:
                self._log.warning(
                    "metadata", "personalize: metadata refresh failed (%s); will retry", exc
                )
            except Exception:
                logger.exception("personalize: unexpected error refreshing metadata")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(),
                    self.interval if self.statuses is not None else min(30.0, self.interval),
                )

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def reset_after_fork(self) -> None:
        """In a forked child (``_fork``): the task is the parent's loop's; start anew."""
        abandon((self._task, self._wake))
        self._task = None
        self._wake = None

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
