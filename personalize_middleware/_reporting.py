"""The report page for any backend: what this process sent to the events API.

In local mode the report counts what ``LocalBackend`` received. With another backend
(the HTTP client, a test double), ``ReportingBackend`` wraps it and records every events
call that succeeded into a bounded ``ReportCounter``: the page then shows what *this
process* tracked (each process of a fleet shows its own share).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from ._interfaces import PersonalizeBackend
from ._models import EventElement, Experience, ExperienceMetadata
from .local import ReportCounter

__all__ = ["ReportingBackend"]


class ReportingBackend:
    """A ``PersonalizeBackend`` that forwards to ``backend`` and counts what it tracked."""

    def __init__(self, backend: PersonalizeBackend, counter: ReportCounter | None = None) -> None:
        self.backend = backend
        self.counter = counter if counter is not None else ReportCounter()

    def report(self) -> Any:
        """What this process tracked (a ``local.Report``)."""
        return self.counter.report()

    async def fetch_experiences(
        self,
        keys: Iterable[str],
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Experience]:
        return await self.backend.fetch_experiences(
            keys, customer_id=customer_id, user_identifiers=user_identifiers, attributes=attributes
        )

    async def fetch_metadata(
        self, statuses: Iterable[str] | None = None
    ) -> list[ExperienceMetadata]:
        return await self.backend.fetch_metadata(statuses)

    async def track_events(self, elements: Sequence[EventElement]) -> None:
        await self.backend.track_events(elements)
        self.counter.record_elements(elements)  # only once the events API took them

    async def aclose(self) -> None:
        await self.backend.aclose()

    async def __aenter__(self) -> Self:
        await self.backend.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
