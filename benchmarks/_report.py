"""Result rows, the spread of a ratio across rounds, and the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Row", "Spread", "fmt_ms", "fmt_us", "format_table", "paired", "rows_as_json"]


@dataclass
class Spread:
    """Per-round values of one figure (ratios, usually): their median, quartiles and range.

    Rounds are interleaved, so a round's ratio divides two figures measured side by side;
    the spread across rounds is what a reader needs to tell a change from noise."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.values) < 2:
            return self.values[0], self.values[0]
        q1, _, q3 = statistics.quantiles(self.values, n=4, method="inclusive")
        return q1, q3

    def text(self, digits: int = 2) -> str:
        """``IQR (min-max)``, e.g. ``1.20-1.25 (1.18-1.31)``."""
        q1, q3 = self.quartiles
        lo, hi = min(self.values), max(self.values)
        return f"{q1:.{digits}f}-{q3:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def paired(measured: Sequence[float], baseline: Sequence[float]) -> Spread:
    """Round-by-round ratios of two figures measured in the same (interleaved) rounds."""
    return Spread([m / b for m, b in zip(measured, baseline, strict=True)])


@dataclass
class Row:
    """One figure: ``measured`` against ``baseline`` (measured in the same run), as a ratio.

    ``ratio`` is the median of ``spread``'s per-round values when there is a spread.
    ``target`` is the issue's target in words; ``met`` is ``None`` where there is none.
    """

    section: str
    name: str
    baseline: str
    measured: str
    ratio: float | None
    spread: Spread | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def fmt_us(value: float) -> str:
    return f"{value:,.1f} µs"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value:.4f}x"
    return f"{value:.2f}x" if value < 100 else f"{value:,.0f}x"


def _spread(row: Row) -> str:
    if row.spread is None:
        return "-"
    digits = 4 if (row.ratio or 1) < 0.01 else 2
    return f"{row.spread.text(digits)} n={len(row.spread.values)}"


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table (also valid Markdown)."""
    header = (
        "Measurement",
        "Baseline (same run)",
        "Measured",
        "Ratio",
        "Spread: IQR (min-max), rounds",
        "Target",
        "Met",
    )
    body = [
        (
            f"{row.section}: {row.name}",
            row.baseline,
            row.measured,
            _ratio(row.ratio),
            _spread(row),
            row.target,
            "-" if row.met is None else ("yes" if row.met else "NO"),
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(cells) for cells in body)
    notes = [f"- {row.section}: {row.name}: {row.note}" for row in rows if row.note]
    if notes:
        out.append("")
        out.append("Notes:")
        out.extend(notes)
    return "\n".join(out)


def rows_as_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        item = asdict(row)
        if row.spread is not None:
            q1, q3 = row.spread.quartiles
            item["spread"] = {
                "values": row.spread.values,
                "median": row.spread.median,
                "q1": q1,
                "q3": q3,
                "min": min(row.spread.values),
                "max": max(row.spread.values),
            }
        out.append(item)
    return out
