"""The local report: impressions, clicks and CTR per experience, variation and ``b_id``.

``ReportCounter`` aggregates recorded events as they arrive (so the report costs nothing
to build however many events were seen), ``render_report`` draws the page (plain HTML,
CSS bars, no script, no third-party asset, every value escaped) and ``local_report_app``
serves it as a tiny ASGI app for the middleware to mount.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .._models import ACTION_CLICKED, ACTION_SHOWN
from ._model import ExperiencesFile

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from ._backend import LocalBackend

__all__ = [
    "ExperienceReport",
    "RecordedEvent",
    "Report",
    "ReportCounter",
    "ReportRow",
    "local_report_app",
    "render_report",
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


@dataclass(frozen=True, slots=True)
class ExperienceReport:
    """One experience: totals, then one row per (audience, variation) and per ``b_id``."""

    key: str
    name: str
    total: ReportRow
    variations: tuple[ReportRow, ...]
    b_ids: tuple[ReportRow, ...]


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the local report page shows."""

    experiences: tuple[ExperienceReport, ...]
    events_recorded: int
    duplicates_ignored: int

    def to_json(self) -> dict[str, Any]:
        def row(r: ReportRow) -> dict[str, Any]:
            return {
                "label": r.label,
                "impressions": r.impressions,
                "clicks": r.clicks,
                "ctr": r.ctr,
            }

        return {
            "events_recorded": self.events_recorded,
            "duplicates_ignored": self.duplicates_ignored,
            "experiences": [
                {
                    "key": e.key,
                    "name": e.name,
                    "total": row(e.total),
                    "variations": [row(v) for v in e.variations],
                    "b_ids": [row(b) for b in e.b_ids],
                }
                for e in self.experiences
            ],
        }


@dataclass
class _Counts:
    name: str
    impressions: int = 0
    clicks: int = 0
    variations: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    b_ids: dict[str, int] = field(default_factory=dict)


class ReportCounter:
    """Thread-safe running totals of recorded events, keyed by experience.

    Events map back to a file experience through their ``cid``; events for a campaign the
    file does not know are grouped under the ``experience`` name they carry.
    """

    def __init__(self, experiences: ExperiencesFile) -> None:
        self._lock = threading.Lock()
        self._by_cid: dict[str, str] = {}
        self._variation_names: dict[tuple[str, str, str], str] = {}
        self._audience_names: dict[tuple[str, str], str] = {}
        self._counts: dict[str, _Counts] = {}
        self.events_recorded = 0
        self.duplicates_ignored = 0
        for key, definition in experiences.experiences.items():
            self._counts[key] = _Counts(name=definition.name)
            for audience in definition.audiences:
                self._by_cid[definition.cid(audience)] = key
                self._audience_names[(key, audience.id)] = audience.name
                for variation in audience.variations:
                    self._variation_names[(key, audience.id, variation.id)] = variation.name

    def experience_key(self, attributes: Mapping[str, Any]) -> str | None:
        """The file's experience key for an event's attributes, if the file knows its cid."""
        return self._by_cid.get(str(attributes.get("cid", "")))

    def add(self, event: RecordedEvent) -> None:
        name = str(event.attributes.get("experience", ""))
        group = event.experience_key or f"(not in file) {name}"
        audience_id = str(event.attributes.get("audience_id", ""))
        variation_id = str(event.attributes.get("moe_variation_id", ""))
        with self._lock:
            self.events_recorded += 1
            counts = self._counts.setdefault(group, _Counts(name=name))
            cell = counts.variations.setdefault((audience_id, variation_id), [0, 0])
            if event.is_click:
                counts.clicks += 1
                cell[1] += 1
                if event.b_id is not None:
                    counts.b_ids[event.b_id] = counts.b_ids.get(event.b_id, 0) + 1
            elif event.action == ACTION_SHOWN:
                counts.impressions += 1
                cell[0] += 1

    def add_duplicate(self) -> None:
        with self._lock:
            self.duplicates_ignored += 1

    def report(self) -> Report:
        with self._lock:
            experiences = tuple(
                self._experience_report(key, counts) for key, counts in self._counts.items()
            )
            return Report(
                experiences=experiences,
                events_recorded=self.events_recorded,
                duplicates_ignored=self.duplicates_ignored,
            )

    def _experience_report(self, key: str, counts: _Counts) -> ExperienceReport:
        variations = tuple(
            ReportRow(
                label=self._variation_label(key, audience_id, variation_id),
                impressions=cell[0],
                clicks=cell[1],
            )
            for (audience_id, variation_id), cell in sorted(counts.variations.items())
        )
        b_ids = tuple(
            ReportRow(label=b_id, impressions=counts.impressions, clicks=clicks)
            for b_id, clicks in sorted(counts.b_ids.items(), key=lambda item: (-item[1], item[0]))
        )
        return ExperienceReport(
            key=key,
            name=counts.name,
            total=ReportRow(label=key, impressions=counts.impressions, clicks=counts.clicks),
            variations=variations,
            b_ids=b_ids,
        )

    def _variation_label(self, key: str, audience_id: str, variation_id: str) -> str:
        variation = self._variation_names.get((key, audience_id, variation_id))
        audience = self._audience_names.get((key, audience_id), f"audience {audience_id}")
        return f"{variation or 'variation ' + variation_id} ({variation_id}) · {audience}"


_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;
color:#1d2430}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin:2rem 0 .25rem}
.key{color:#5b6472;font:13px ui-monospace,monospace}
table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #e3e6ea;vertical-align:middle}
th{font-weight:600;color:#5b6472;font-size:13px}td.n{text-align:right;width:6rem}
.bar{background:#eef1f4;height:.8rem;width:12rem;border-radius:3px;overflow:hidden}
.bar>span{display:block;height:100%;background:#3b82f6}
.bar.clicks>span{background:#f59e0b}
.muted{color:#5b6472}.section{font-weight:600;background:#f7f8fa}
"""


def render_report(report: Report, *, title: str = "Personalize local report") -> str:
    """The report as a self-contained HTML page (no script, every value escaped)."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{report.events_recorded} events recorded, '
        f"{report.duplicates_ignored} duplicates ignored (same moe_event_uuid). "
        "Reload the page to update.</p>",
    ]
    if not report.experiences:
        parts.append("<p>No experiences and no events yet.</p>")
    for experience in report.experiences:
        parts.append(_experience_section(experience))
    parts.append("</body></html>")
    return "\n".join(parts)


def _experience_section(experience: ExperienceReport) -> str:
    max_impressions = max([experience.total.impressions, 1])
    rows = [_row(experience.total, max_impressions, label="All traffic")]
    if experience.variations:
        rows.append('<tr class="section"><td colspan="6">Per variation</td></tr>')
        rows.extend(_row(row, max_impressions) for row in experience.variations)
    if experience.b_ids:
        rows.append('<tr class="section"><td colspan="6">Clicks per b_id</td></tr>')
        rows.extend(_row(row, max_impressions) for row in experience.b_ids)
    return (
        f'<h2>{_e(experience.name)} <span class="key">{_e(experience.key)}</span></h2>'
        "<table><thead><tr><th></th><th>Impressions</th><th></th><th>Clicks</th><th></th>"
        '<th class="n">CTR</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
    )


def _row(row: ReportRow, max_impressions: int, *, label: str | None = None) -> str:
    ctr = "—" if row.ctr is None else f"{row.ctr:.1%}"
    return (
        f"<tr><td>{_e(label or row.label)}</td>"
        f'<td class="n">{row.impressions}</td><td>{_bar(row.impressions, max_impressions)}</td>'
        f'<td class="n">{row.clicks}</td><td>{_bar(row.clicks, max_impressions, "clicks")}</td>'
        f'<td class="n">{_e(ctr)}</td></tr>'
    )


def _bar(value: int, maximum: int, kind: str = "") -> str:
    width = min(100.0, 100.0 * value / maximum) if maximum else 0.0
    css = f"bar {kind}".strip()
    return f'<div class="{css}"><span style="width:{width:.1f}%"></span></div>'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    # Inline styles only: the bars are style attributes; no script may run at all.
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'"),
]


def local_report_app(backend: LocalBackend) -> ASGIApp:
    """An ASGI app serving the report page, and its data as JSON at any path ending in
    ``/report.json``. Every other GET path gets the page, so it works mounted under any
    prefix (a Starlette ``Mount``, or a dispatcher passing the full path)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        if scope.get("method") not in ("GET", "HEAD"):
            await _respond(send, 405, b"text/plain; charset=utf-8", b"Method Not Allowed", scope)
        elif path.endswith("/report.json"):
            body = json.dumps(backend.report().to_json()).encode()
            await _respond(send, 200, b"application/json", body, scope)
        else:
            # Whatever path a dispatcher hands over (a Mount's, or the full one): the page.
            page = render_report(backend.report()).encode()
            await _respond(send, 200, b"text/html; charset=utf-8", page, scope)

    return app


async def _lifespan(receive: Receive, send: Send) -> None:
    # Nothing to start or stop; answering keeps servers happy when run standalone.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send: Send, status: int, content_type: bytes, body: bytes, scope: Scope) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *_SECURITY_HEADERS,
    ]
    if status == 405:
        headers.append((b"allow", b"GET, HEAD"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
