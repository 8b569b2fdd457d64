"""Experience metadata: which configured keys are live, and typo detection."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging

from .._exceptions import APIError
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
        self._task: asyncio.Task[None] | None = None
        self._warned = False
        self._log = RateLimitedLog(logger, interval=3600)

    def active(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        """The keys worth requesting: Active ones (all of them while metadata is unknown)."""
        statuses = self.statuses
        if statuses is None:
            return keys
        return tuple(k for k in keys if statuses.get(k) == "Active")

    def status(self, key: str) -> str | None:
        """``key``'s status (``Active``, ``Paused``, ``Scheduled``), ``None`` when the
        workspace has no such key (or metadata is not known yet: then ``""``)."""
        statuses = self.statuses
        return "" if statuses is None else statuses.get(key)

    async def refresh(self) -> list[ExperienceMetadata]:
        entries = await self.backend.fetch_metadata(EXPERIENCE_STATUSES)
        self.statuses = {entry.key: entry.status for entry in entries}
        if not self._warned:
            self._warned = True
            self._report_unknown_keys()
        return entries

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
        while True:
            try:
                await self.refresh()
            except APIError as exc:
                self._log.warning(
                    "metadata", "personalize: metadata refresh failed (%s); will retry", exc
                )
            except Exception:
                logger.exception("personalize: unexpected error refreshing metadata")
            await asyncio.sleep(
                self.interval if self.statuses is not None else min(30.0, self.interval)
            )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
