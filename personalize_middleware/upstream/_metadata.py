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
from collections.abc import Awaitable, Callable

from .._exceptions import APIError
from .._fork import abandon, register
from .._interfaces import PersonalizeBackend
from .._logging import RateLimitedLog
from .._models import EXPERIENCE_STATUSES, ExperienceMetadata

__all__ = ["DEFAULT_METADATA_REFRESH", "MetadataWatcher", "suggest_key"]

logger = logging.getLogger("personalize_middleware.metadata")

DEFAULT_METADATA_REFRESH = 300.0


def suggest_key(key: str, known: list[str]) -> str | None:
    """The closest known key to ``key`` ("did you mean ...?"), if any is close."""
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return matches[0] if matches else None


class MetadataWatcher:
    """Fetches metadata at start-up (in the background: never blocks start-up) and every
    ``interval`` seconds. Until the first answer, every key is requested."""

    def __init__(
        self,
        backend: PersonalizeBackend,
        configured_keys: tuple[str, ...],
        *,
        interval: float = DEFAULT_METADATA_REFRESH,
    ) -> None:
        self.backend = backend
        self.configured_keys = configured_keys
        self.interval = interval
        self.statuses: dict[str, str] | None = None
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
        """The keys worth requesting: Active ones (all of them while metadata is unknown)."""
        statuses = self.statuses
        if statuses is None:
            return keys
        return tuple(k for k in keys if statuses.get(k) == "Active")

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
                    "personalize: configured experience key %r is unknown to the workspace%s",
                    key,
                    f"; did you mean {hint!r}?" if hint else "",
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
