"""What the local report is made of: recorded events, rows, the ``Report`` and its source.

This module is the bottom of the report's little stack and imports nothing else from
``local``: ``ReportCounter`` (``_counter``) builds a ``Report``, ``LocalBackend``
(``_backend``) owns a counter, and the page (``_report_app``) draws any ``ReportSource``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from .._models import ACTION_CLICKED

__all__ = [
    "ExperienceReport",
    "RecordedEvent",
    "Report",
    "ReportRow",
    "ReportSource",
]


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """One impression or click the local backend accepted (after de-duplication)."""

    customer_id: str
    action: str
    moe_event_uuid: str
    event_time: int
    platform: str
    attributes: Mapping[str, Any]
    b_id: str | None
    experience_key: str | None

    @property
    def is_click(self) -> bool:
        return self.action == ACTION_CLICKED

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (one line of the events log)."""
        data = asdict(self)
        data["attributes"] = dict(self.attributes)
        return data


@dataclass(frozen=True, slots=True)
class ReportRow:
    """Counts for one line of the report. For a ``b_id`` row, ``impressions`` are the
    experience's, so ``ctr`` is that button's click-through rate."""

    label: str
    impressions: int
    clicks: int

    @property
    def ctr(self) -> float | None:
        """Clicks per impression (0..1+), or None with no impressions."""
        return self.clicks / self.impressions if self.impressions else None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "impressions": self.impressions,
            "clicks": self.clicks,
            "ctr": self.ctr,
        }


@dataclass(frozen=True, slots=True)
class ExperienceReport:
    """One experience: totals, then one row per (audience, variation) and per ``b_id``.

    The counter keeps a bounded number of variation and ``b_id`` rows; whatever did not
    get a row of its own is summed in ``other_variations`` / ``other_b_ids`` (None when
    nothing overflowed), so the rows plus the "other" row always add up to ``total``.
    """

    key: str
    name: str
    total: ReportRow
    variations: tuple[ReportRow, ...]
    b_ids: tuple[ReportRow, ...]
    other_variations: ReportRow | None = None
    other_b_ids: ReportRow | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "total": self.total.to_json(),
            "variations": [row.to_json() for row in self.variations],
            "b_ids": [row.to_json() for row in self.b_ids],
            "other_variations": _optional_json(self.other_variations),
            "other_b_ids": _optional_json(self.other_b_ids),
        }


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the local report page shows.

    ``other_experiences`` sums the events of experiences that came after the counter's
    limit of experiences it does not know from the file (None when there were none).
    """

    experiences: tuple[ExperienceReport, ...]
    events_recorded: int
    duplicates_ignored: int
    other_experiences: ExperienceReport | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``report.json`` document."""
        return {
            "events_recorded": self.events_recorded,
            "duplicates_ignored": self.duplicates_ignored,
            "experiences": [experience.to_json() for experience in self.experiences],
            "other_experiences": _optional_json(self.other_experiences),
        }


@runtime_checkable
class ReportSource(Protocol):
    """Anything the report page can be drawn from: a ``ReportCounter``, a
    ``LocalBackend``, or any object of yours with a ``report()`` method."""

    def report(self) -> Report: ...


def _optional_json(value: ReportRow | ExperienceReport | None) -> dict[str, Any] | None:
    return None if value is None else value.to_json()
