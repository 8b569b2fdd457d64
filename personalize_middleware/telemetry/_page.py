"""``PageObserver``: how each key of one page was answered, for the page's ``PageTrace``.

The ``Personalization`` handle reports what only it sees (which keys the cache answered at
once, which are not Active); the rest is read off the store when the page finishes: a key
fetched for this page whose cached entry is now fresh was answered by the upstream (or the
shared L2), one whose entry is old got the stale-if-error fallback, one with no entry got
nothing. Only pages of a middleware with telemetry get an observer.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, NamedTuple

from .._interfaces import KeyOutcome, KeyReason, PageTrace, Telemetry
from .._models import Experience, FetchQuery

if TYPE_CHECKING:
    from ..cache import ExperienceStore

__all__ = ["Outcome", "PageObserver", "observe_page"]


class Outcome(NamedTuple):
    """One key's ``KeyOutcome``."""

    reason: KeyReason
    experience: Experience | None


class PageObserver:
    """Follows one page view's keys and hands their outcomes to its ``PageTrace``."""

    __slots__ = ("_notes", "_store", "trace")

    def __init__(self, trace: PageTrace, store: ExperienceStore) -> None:
        self.trace = trace
        self._store = store
        self._notes: dict[str, KeyReason] = {}

    def activate(self) -> AbstractContextManager[object]:
        return self.trace.activate()

    def looked_up(self, query: FetchQuery, found: Iterable[str]) -> None:
        """``found`` came from the cache just now: fresh, or stale with a refresh started."""
        ttl = self._store.ttl
        ages = self._store.ages(query, found)
        for key in found:
            age = ages.get(key)
            self._notes[key] = "cached" if age is not None and age < ttl else "stale"

    def disabled(self, keys: Iterable[str]) -> None:
        """``keys`` are not Active in the workspace: the page renders their defaults."""
        for key in keys:
            self._notes[key] = "disabled"

    def finish(
        self,
        query: FetchQuery | None,
        resolved: Mapping[str, Experience | None],
        pending: Collection[str],
        budget_spent: bool,
    ) -> None:
        """The page is done with personalization: ``resolved`` is what it got, ``pending``
        what had not arrived (after the latency budget: an error; before: not waited for)."""
        outcomes: dict[str, KeyOutcome] = {}
        notes = self._notes
        fetched = [key for key in resolved if key not in notes]
        ages = self._store.ages(query, fetched) if fetched and query is not None else {}
        for key, experience in resolved.items():
            reason = notes.get(key) or _fetched(ages.get(key), self._store.ttl, experience)
            outcomes[key] = Outcome(reason, experience)
        late: KeyReason = "error" if budget_spent else "default"
        for key in pending:
            outcomes[key] = Outcome(late, None)
        self.trace.finish(outcomes)


def _fetched(age: float | None, ttl: float, experience: Experience | None) -> KeyReason:
    """The reason of a key fetched for the page, from its cache entry's age now."""
    if age is None:
        return "error"  # the fetch failed (or was shed) and nothing was cached
    if age >= ttl:
        return "stale"  # stale-if-error stood in for a failed fetch
    return "default" if experience is None else "targeting_match"


def observe_page(
    telemetry: Telemetry, keys: tuple[str, ...], store: ExperienceStore
) -> PageObserver | None:
    """An observer for a page starting now, or ``None`` when no telemetry traces pages."""
    trace = telemetry.page_started(keys)
    return None if trace is None else PageObserver(trace, store)
