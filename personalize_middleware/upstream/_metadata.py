"""Experience metadata: which configured keys are live, and typo detection."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import re

from .._exceptions import APIError
from .._interfaces import PersonalizeBackend
from .._logging import RateLimitedLog
from .._models import EXPERIENCE_STATUSES, ExperienceMetadata

__all__ = ["DEFAULT_METADATA_REFRESH", "MetadataWatcher", "suggest_key"]

logger = logging.getLogger("personalize_middleware.metadata")

DEFAULT_METADATA_REFRESH = 300.0


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
                    "personalize: configured experience key %r is not in %s; %s",
                    key,
                    self.source,
                    f"did you mean {hint!r}?" if hint else _known_keys(known),
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
