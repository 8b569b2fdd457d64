"""Run the benchmarks and print the table: ``python -m benchmarks.run`` (or ``scripts/bench``).

Every figure is a ratio against a baseline measured in the same run, so the table means
the same on any machine; absolute times are printed only beside their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ._report import Row, format_table, rows_as_json

__all__ = ["main"]

Section = Callable[[bool], Coroutine[Any, Any, list[Row]]]


def _sections() -> dict[str, Section]:
    from . import events, inprocess, memory, overhttp, upstream

    async def http(quick: bool) -> list[Row]:
        return overhttp.run(quick=quick)  # subprocesses; nothing to await

    return {
        "inprocess": lambda quick: inprocess.run(quick=quick),
        "http": http,
        "upstream": lambda quick: upstream.run(quick=quick),
        "events": lambda quick: events.run(quick=quick),
        "memory": lambda quick: memory.run(quick=quick),
    }


def main(argv: list[str] | None = None) -> int:
    sections = _sections()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    parser.add_argument(
        "--only", action="append", choices=sorted(sections), help="run only these sections"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows: list[Row] = []
    started = time.monotonic()
    for name, section in sections.items():
        if args.only and name not in args.only:
            continue
        print(f"==> {name}", file=sys.stderr, flush=True)
        rows.extend(asyncio.run(section(args.quick)))
    print(
        f"personalize-middleware benchmarks: Python {platform.python_version()} on "
        f"{platform.machine()} {platform.system()}, {time.monotonic() - started:.0f} s"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows_as_json(rows), out, indent=2)
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
