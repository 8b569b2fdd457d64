"""``LocalBackend``: the embedded engine behind the same interface as the HTTP client."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio.to_thread

from .._config import positive_int
from .._contract import attributes_body, identifiers_body, statuses_query, unique_keys
from .._decisions import LOCAL
from .._exceptions import BadRequestError, ConfigurationError
from .._models import EXPERIENCE_STATUSES, EventElement, Experience, ExperienceMetadata
from ._counter import DEFAULT_MAX_REPORT_ROWS, ReportCounter
from ._engine import evaluate
from ._file import load_experiences_file, load_sample_file, parse_experiences
from ._model import ExperiencesFile
from ._report import RecordedEvent, Report
from ._wire import WireError, error_code, validate_elements, validate_session_attributes

__all__ = ["DEFAULT_MAX_EVENTS", "LocalBackend"]

logger = logging.getLogger("personalize_middleware")

#: How many recorded events ``LocalBackend.events`` keeps (the report counts them all).
DEFAULT_MAX_EVENTS = 10_000
# MoEngage de-duplicates within a window too; a bound keeps a long-running dev server small.
_MAX_REMEMBERED_UUIDS = 1_000_000


class LocalBackend:
    """MoEngage Personalize evaluated in process from a local experiences file.

    ``path_or_data`` is a ``.json`` / ``.yaml`` file path, already-parsed file content (a
    mapping) or an ``ExperiencesFile``; a bad file raises ``ConfigurationError`` here, at
    start-up. Events are validated like the API validates them, de-duplicated on
    ``moe_event_uuid``, kept in memory (``events``, ``report()``) and, with ``events_log``,
    appended to that JSON Lines file (whose earlier lines are read back at start-up, so the
    report survives a restart). ``max_events`` bounds ``events``; ``max_report_rows`` bounds
    the report's rows (see ``ReportCounter``), whose counts stay exact.
    """

    #: What a fetch's ``Decision`` names as its source (``Personalization.why``).
    decision_source = LOCAL

    def __init__(
        self,
        path_or_data: str | os.PathLike[str] | Mapping[str, Any] | ExperiencesFile,
        *,
        events_log: str | os.PathLike[str] | None = None,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_report_rows: int = DEFAULT_MAX_REPORT_ROWS,
    ) -> None:
        if isinstance(path_or_data, ExperiencesFile):
            self._file = path_or_data
        elif isinstance(path_or_data, Mapping):
            self._file = parse_experiences(path_or_data)
        else:
            self._file = load_experiences_file(path_or_data)
        self._events: deque[RecordedEvent] = deque(maxlen=positive_int("max_events", max_events))
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._counter = ReportCounter(
            self._file, max_rows=positive_int("max_report_rows", max_report_rows)
        )
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._events_log = Path(events_log) if events_log is not None else None
        if self._events_log is not None:
            if not self._events_log.parent.is_dir():
                raise ConfigurationError(
                    f"events_log: directory {str(self._events_log.parent)!r} does not exist",
                    field="events_log",
                )
            self._replay(self._events_log)

    @classmethod
    def default(cls, *, events_log: str | os.PathLike[str] | None = None) -> LocalBackend:
        """A backend on the experiences file packaged with the library (the demo shop's)."""
        return cls(load_sample_file(), events_log=events_log)

    @property
    def experiences(self) -> ExperiencesFile:
        """The validated experiences file."""
        return self._file

    @property
    def events(self) -> tuple[RecordedEvent, ...]:
        """The most recent recorded events (duplicates excluded), oldest first."""
        with self._lock:
            return tuple(self._events)

    @property
    def report_counter(self) -> ReportCounter:
        """The counter this backend records its accepted events in."""
        return self._counter

    def report(self) -> Report:
        """Impressions, clicks and CTR per experience, per variation and per ``b_id``."""
        return self._counter.report()

    def __repr__(self) -> str:
        return (
            f"LocalBackend(source={self._file.source!r}, "
            f"experiences={len(self._file.experiences)}, events={len(self._events)})"
        )

    # -- the PersonalizeBackend protocol ------------------------------------------------

    async def fetch_experiences(
        self,
        keys: Iterable[str],
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Experience]:
        """The experiences this user gets, as Fetch Experience would answer.

        Arguments are checked exactly as ``PersonalizeClient`` checks them (so code that
        works locally works against MoEngage); in process there is no 25-key limit.
        """
        # The client's own argument checks: one behaviour for both backends.
        wanted = unique_keys(keys)
        identifiers_body(customer_id, user_identifiers)
        attributes_body(attributes)
        if not wanted:
            return {}
        wire = self.evaluate(
            wanted,
            customer_id=customer_id,
            user_identifiers=user_identifiers,
            attributes=attributes,
        )
        return {key: Experience.from_api(key, data) for key, data in wire.items()}

    def evaluate(
        self,
        keys: Iterable[str] | None,
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Fetch Experience's ``experiences`` object (wire shape) for one user."""
        key_list = None if keys is None else list(keys)
        try:
            if key_list is not None and not all(isinstance(k, str) for k in key_list):
                raise WireError("experience_key - must be an array of strings")
            if customer_id is not None and not isinstance(customer_id, str):
                raise WireError("identifiers.customer_id - must be a string")
            validate_session_attributes(attributes or {})
        except WireError as exc:
            raise _bad_request(exc, "/experiences/fetch") from None
        return evaluate(
            self._file,
            key_list,
            customer_id=customer_id,
            user_identifiers=user_identifiers,
            attributes=attributes,
        )

    async def fetch_metadata(
        self, statuses: Iterable[str] | None = None
    ) -> list[ExperienceMetadata]:
        """Every experience of the file, filtered by status; like ``PersonalizeClient``, a
        status in the wrong case raises ``ConfigurationError`` and a string may hold
        comma-separated values."""
        return self.metadata(statuses_query(statuses) or None)

    def metadata(self, statuses: Iterable[str] | None = None) -> list[ExperienceMetadata]:
        """Synchronous ``fetch_metadata``: unknown statuses simply match nothing."""
        wanted = set(EXPERIENCE_STATUSES if statuses is None else statuses)
        return [
            ExperienceMetadata(key=d.key, name=d.name, status=d.status)
            for d in self._file.experiences.values()
            if d.status in wanted
        ]

    async def track_events(self, elements: Sequence[EventElement]) -> None:
        """Validate (as the API: raises ``BadRequestError``), de-duplicate and record."""
        if not elements:
            return
        try:
            validate_elements(elements)
        except WireError as exc:
            raise _bad_request(exc, "/experiences/events") from None
        recorded = self._record(elements)
        if recorded and self._events_log is not None:
            await anyio.to_thread.run_sync(self._append_to_log, recorded)

    async def aclose(self) -> None:
        """Nothing to release: events are written as they are tracked."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- recording ------------------------------------------------------------------------

    def _record(self, elements: Sequence[Mapping[str, Any]]) -> list[RecordedEvent]:
        recorded: list[RecordedEvent] = []
        for element in elements:
            for action in element["actions"]:
                attributes = dict(action["attributes"])
                b_id = attributes.get("b_id", action.get("b_id"))
                event = RecordedEvent(
                    customer_id=element["customer_id"],
                    action=action["action"],
                    moe_event_uuid=action["moe_event_uuid"].lower(),
                    event_time=action["event_time"],
                    platform=action["platform"].lower(),
                    attributes=attributes,
                    b_id=b_id,
                    experience_key=self._counter.experience_key(attributes),
                )
                if self._remember(event):
                    recorded.append(event)
        return recorded

    def _remember(self, event: RecordedEvent) -> bool:
        """Record an event unless its uuid was seen before (MoEngage de-duplicates on it)."""
        with self._lock:
            if event.moe_event_uuid in self._seen:
                duplicate = True
            else:
                duplicate = False
                self._seen[event.moe_event_uuid] = None
                if len(self._seen) > _MAX_REMEMBERED_UUIDS:
                    self._seen.popitem(last=False)
                self._events.append(event)
        if duplicate:
            self._counter.record_duplicate()
        else:
            self._counter.record_event(event)
        return not duplicate

    def _append_to_log(self, events: list[RecordedEvent]) -> None:
        assert self._events_log is not None
        lines = "".join(json.dumps(event.to_json(), ensure_ascii=False) + "\n" for event in events)
        try:
            with self._log_lock, self._events_log.open("a", encoding="utf-8") as log:
                log.write(lines)
        except OSError as exc:
            # The events are recorded in memory already; a full disk must not fail tracking.
            logger.warning("personalize: cannot append to events log %s: %s", self._events_log, exc)

    def _replay(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"events_log: cannot read {str(path)!r}: {exc}", field="events_log"
            ) from exc
        skipped = 0
        for line in text.splitlines():
            event = _event_from_log_line(line, self._counter)
            if event is None:
                skipped += bool(line.strip())
            else:
                self._remember(event)
        if skipped:
            # A crash can leave half a line behind; that must not stop the app from starting.
            logger.warning("personalize: skipped %d unreadable line(s) in %s", skipped, path)


def _event_from_log_line(line: str, counter: ReportCounter) -> RecordedEvent | None:
    try:
        data = json.loads(line)
        if not isinstance(data, dict):
            return None
        validate_elements(
            [
                {
                    "customer_id": data["customer_id"],
                    "actions": [{k: data[k] for k in _ACTION_KEYS}],
                }
            ]
        )
        b_id = data.get("b_id")
        return RecordedEvent(
            customer_id=data["customer_id"],
            action=data["action"],
            moe_event_uuid=data["moe_event_uuid"],
            event_time=data["event_time"],
            platform=data["platform"],
            attributes=data["attributes"],
            b_id=b_id if isinstance(b_id, str) else None,
            experience_key=counter.experience_key(data["attributes"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


_ACTION_KEYS = ("action", "moe_event_uuid", "event_time", "platform", "attributes")


def _bad_request(exc: WireError, endpoint: str) -> BadRequestError:
    return BadRequestError(
        f"local backend refused {endpoint}: {exc.description}",
        endpoint=endpoint,
        title=exc.title,
        description=exc.description,
        code=error_code(),
    )
