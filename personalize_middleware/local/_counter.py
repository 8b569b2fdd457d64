"""``ReportCounter``: running, bounded totals of impressions and clicks.

Anyone can feed it: ``LocalBackend`` records the events it accepts, and a caller holding
another backend (the HTTP client) can record the events it sends with
``record_elements``. The counter aggregates as events arrive, so building a ``Report``
costs the same however many events were seen.

Memory is bounded whatever labels arrive (an event flood with a fresh ``b_id`` each time
must not grow a dev server without limit): per experience at most ``max_rows`` variation
rows besides the file's own variations and at most ``max_rows`` ``b_id`` rows, and at
most ``max_rows`` experiences the file does not know. Rows are given to labels in the
order they first appear; later labels are summed in an "other" row, so totals stay exact.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._config import positive_int
from .._models import ACTION_CLICKED, ACTION_SHOWN, EventElement
from ._model import ExperiencesFile
from ._report import ExperienceReport, RecordedEvent, Report, ReportRow

__all__ = [
    "DEFAULT_MAX_REPORT_ROWS",
    "OTHER_B_IDS_LABEL",
    "OTHER_EXPERIENCES_KEY",
    "OTHER_VARIATIONS_LABEL",
    "ReportCounter",
]

#: Distinct rows kept per kind (variations and ``b_id``s of an experience, experiences
#: unknown to the file) before the rest is summed in an "other" row. A page of 50 rows is
#: still readable; a real experience rarely has more buttons or variations than that.
DEFAULT_MAX_REPORT_ROWS = 50
#: Labels of the "other" rows, and the key of the group of overflowing experiences.
OTHER_VARIATIONS_LABEL = "Other variations"
OTHER_B_IDS_LABEL = "Other b_ids"
OTHER_EXPERIENCES_KEY = "(other experiences)"
_OTHER_EXPERIENCES_NAME = "Other experiences"


@dataclass
class _Cell:
    impressions: int = 0
    clicks: int = 0

    def row(self, label: str) -> ReportRow:
        return ReportRow(label=label, impressions=self.impressions, clicks=self.clicks)


@dataclass
class _Group:
    """The running totals of one experience (or of the overflowing experiences)."""

    name: str
    total: _Cell = field(default_factory=_Cell)
    variations: dict[tuple[str, str], _Cell] = field(default_factory=dict)
    other_variations: _Cell | None = None
    b_ids: dict[str, int] = field(default_factory=dict)
    other_b_id_clicks: int | None = None


class ReportCounter:
    """Thread-safe running totals of impressions and clicks, keyed by experience.

    ``experiences`` (optional) is the local experiences file: its experiences are listed
    even before any event, an event maps back to one through its ``cid``, and variation
    and audience ids get the file's names. Events of an experience the file does not know
    (or, without a file, every event not given an ``experience_key``) are grouped under
    the ``experience`` name they carry. ``max_rows`` bounds the rows kept (see the module
    docstring); ``ConfigurationError`` if it is not a positive integer.

    The counter does not de-duplicate: feed each event once (``LocalBackend`` drops
    repeated ``moe_event_uuid``s before recording and counts them with
    ``record_duplicate``).
    """

    def __init__(
        self,
        experiences: ExperiencesFile | None = None,
        *,
        max_rows: int = DEFAULT_MAX_REPORT_ROWS,
    ) -> None:
        self._max_rows = positive_int("max_rows", max_rows)
        self._has_file = experiences is not None
        self._lock = threading.Lock()
        self._by_cid: dict[str, str] = {}
        self._variation_names: dict[tuple[str, str, str], str] = {}
        self._audience_names: dict[tuple[str, str], str] = {}
        self._groups: dict[str, _Group] = {}
        self._file_keys: frozenset[str] = frozenset()
        self._other_group: _Group | None = None
        self._events_recorded = 0
        self._duplicates_ignored = 0
        if experiences is not None:
            self._index(experiences)

    def _index(self, experiences: ExperiencesFile) -> None:
        for key, definition in experiences.experiences.items():
            self._groups[key] = _Group(name=definition.name)
            for audience in definition.audiences:
                self._by_cid[definition.cid(audience)] = key
                self._audience_names[(key, audience.id)] = audience.name
                for variation in audience.variations:
                    self._variation_names[(key, audience.id, variation.id)] = variation.name
        self._file_keys = frozenset(self._groups)

    @property
    def max_rows(self) -> int:
        """The bound on distinct rows per kind."""
        return self._max_rows

    @property
    def events_recorded(self) -> int:
        """Events recorded so far (impressions, clicks and any other action)."""
        return self._events_recorded

    @property
    def duplicates_ignored(self) -> int:
        """Events ``record_duplicate`` was called for."""
        return self._duplicates_ignored

    def __repr__(self) -> str:
        return (
            f"ReportCounter(experiences={len(self._file_keys)}, max_rows={self._max_rows}, "
            f"events_recorded={self._events_recorded})"
        )

    def experience_key(self, attributes: Mapping[str, Any]) -> str | None:
        """The file's experience key for an event's attributes, if the file knows its cid."""
        return self._by_cid.get(str(attributes.get("cid", "")))

    # -- feeding --------------------------------------------------------------------------

    def record(
        self,
        action: str,
        attributes: Mapping[str, Any],
        *,
        b_id: str | None = None,
        experience_key: str | None = None,
    ) -> None:
        """Count one event.

        ``action`` is ``MOE_PERSONALIZATION_MESSAGE_SHOWN`` (an impression) or
        ``MOE_PERSONALIZATION_MESSAGE_CLICKED`` (a click); any other action only adds to
        ``events_recorded``. ``attributes`` are the event's attributes: the experience
        context the Fetch Experience answer carried (``cid``, ``experience``,
        ``audience_id``, ``moe_variation_id``, ...). ``b_id`` names the clicked element
        (default: ``attributes["b_id"]``). ``experience_key`` groups the event under that
        key (default: the file's experience with the event's ``cid``, else the
        ``experience`` name).
        """
        if b_id is None and isinstance(attributes.get("b_id"), str):
            b_id = attributes["b_id"]
        key, name = self._group_key(attributes, experience_key)
        variation = (
            str(attributes.get("audience_id", "")),
            str(attributes.get("moe_variation_id", "")),
        )
        with self._lock:
            self._events_recorded += 1
            group = self._group(key, name)
            cell = self._variation_cell(group, key, variation)
            if action == ACTION_CLICKED:
                group.total.clicks += 1
                cell.clicks += 1
                if b_id is not None:
                    self._count_b_id(group, b_id)
            elif action == ACTION_SHOWN:
                group.total.impressions += 1
                cell.impressions += 1

    def record_event(self, event: RecordedEvent) -> None:
        """Count an event the local backend recorded."""
        self.record(
            event.action, event.attributes, b_id=event.b_id, experience_key=event.experience_key
        )

    def record_elements(self, elements: Iterable[EventElement]) -> int:
        """Count every action of Track Experience Events elements (the ``EventElement``
        dicts any backend's ``track_events`` takes: ``customer_id`` plus ``actions``, each
        with its ``attributes``); a ``b_id`` is read from the attributes or beside them.
        Returns how many actions were counted.

        Call it once per event actually sent (not again on a retry with the same
        ``moe_event_uuid``): the counter does not de-duplicate.
        """
        counted = 0
        for element in elements:
            for action in element["actions"]:
                fields: Mapping[str, Any] = action
                attributes = fields.get("attributes") or {}
                b_id = attributes.get("b_id", fields.get("b_id"))
                self.record(
                    str(fields.get("action", "")),
                    attributes,
                    b_id=b_id if isinstance(b_id, str) else None,
                )
                counted += 1
        return counted

    def record_duplicate(self) -> None:
        """Count an event dropped as a repeat of an already recorded ``moe_event_uuid``."""
        with self._lock:
            self._duplicates_ignored += 1

    # -- reading --------------------------------------------------------------------------

    def report(self) -> Report:
        """The totals so far: the file's experiences first (in file order), then the
        others in the order they first appeared."""
        with self._lock:
            experiences = tuple(
                self._experience_report(key, group) for key, group in self._groups.items()
            )
            other = self._other_group
            return Report(
                experiences=experiences,
                events_recorded=self._events_recorded,
                duplicates_ignored=self._duplicates_ignored,
                other_experiences=(
                    None if other is None else self._experience_report(OTHER_EXPERIENCES_KEY, other)
                ),
            )

    # -- internals (called with the lock held, except _group_key) -------------------------

    def _group_key(
        self, attributes: Mapping[str, Any], experience_key: str | None
    ) -> tuple[str, str]:
        name = str(attributes.get("experience", ""))
        key = experience_key or self.experience_key(attributes)
        if key is not None:
            return key, name
        label = name or str(attributes.get("cid", ""))
        return (f"(not in file) {label}" if self._has_file else label), name

    def _group(self, key: str, name: str) -> _Group:
        group = self._groups.get(key)
        if group is not None:
            return group
        if len(self._groups) - len(self._file_keys) < self._max_rows:
            group = self._groups[key] = _Group(name=name)
            return group
        if self._other_group is None:
            self._other_group = _Group(name=_OTHER_EXPERIENCES_NAME)
        return self._other_group

    def _variation_cell(self, group: _Group, key: str, variation: tuple[str, str]) -> _Cell:
        cell = group.variations.get(variation)
        if cell is not None:
            return cell
        if len(group.variations) < self._max_rows or (key, *variation) in self._variation_names:
            cell = group.variations[variation] = _Cell()
            return cell
        if group.other_variations is None:
            group.other_variations = _Cell()
        return group.other_variations

    def _count_b_id(self, group: _Group, b_id: str) -> None:
        if b_id in group.b_ids or len(group.b_ids) < self._max_rows:
            group.b_ids[b_id] = group.b_ids.get(b_id, 0) + 1
        else:
            group.other_b_id_clicks = (group.other_b_id_clicks or 0) + 1

    def _experience_report(self, key: str, group: _Group) -> ExperienceReport:
        impressions = group.total.impressions
        variations = tuple(
            cell.row(self._variation_label(key, audience_id, variation_id))
            for (audience_id, variation_id), cell in sorted(group.variations.items())
        )
        b_ids = tuple(
            ReportRow(label=b_id, impressions=impressions, clicks=clicks)
            for b_id, clicks in sorted(group.b_ids.items(), key=lambda item: (-item[1], item[0]))
        )
        other_b_ids = group.other_b_id_clicks
        return ExperienceReport(
            key=key,
            name=group.name,
            total=group.total.row(key),
            variations=variations,
            b_ids=b_ids,
            other_variations=(
                None
                if group.other_variations is None
                else group.other_variations.row(OTHER_VARIATIONS_LABEL)
            ),
            other_b_ids=(
                None
                if other_b_ids is None
                else ReportRow(label=OTHER_B_IDS_LABEL, impressions=impressions, clicks=other_b_ids)
            ),
        )

    def _variation_label(self, key: str, audience_id: str, variation_id: str) -> str:
        variation = self._variation_names.get((key, audience_id, variation_id))
        audience = self._audience_names.get((key, audience_id), f"audience {audience_id}")
        return f"{variation or 'variation ' + variation_id} ({variation_id}) · {audience}"
