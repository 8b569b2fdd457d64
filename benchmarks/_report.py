"""Result rows and the printed table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Row", "fmt_us", "format_table", "rows_as_json"]


@dataclass
class Row:
    """One figure: ``measured`` against ``baseline`` (measured in the same run), as a ratio.

    ``target`` is the issue's target in words; ``met`` is ``None`` where there is none.
    """

    section: str
    name: str
    baseline: str
    measured: str
    ratio: float | None
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


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table (also valid Markdown)."""
    header = ("Measurement", "Baseline (same run)", "Measured", "Ratio", "Target", "Met")
    body = [
        (
            f"{row.section}: {row.name}",
            row.baseline,
            row.measured,
            _ratio(row.ratio),
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
    return [asdict(row) for row in rows]
