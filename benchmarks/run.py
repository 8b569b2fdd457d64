"""Run the benchmarks and print the table: ``python -m benchmarks.run`` (or ``scripts/bench``).

Every figure is a ratio against a baseline measured in the same run, the two measured
in interleaved rounds (or, over HTTP, at the same time), so the table means the same on
any machine; the ratio is the median of the per-round ratios and the spread column gives
their interquartile range and min-max. Absolute figures are printed only beside ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from importlib import metadata
from typing import Any

from ._report import Row, format_table, rows_as_json

__all__ = ["main"]

Section = Callable[[bool], Coroutine[Any, Any, list[Row]]]


def _sections() -> dict[str, Section]:
    from . import coldpath, events, gc_hits, growth, inprocess, memory, overhttp, upstream

    async def http(quick: bool) -> list[Row]:
        return overhttp.run(quick=quick)  # subprocesses; nothing to await

    return {
        "inprocess": lambda quick: inprocess.run(quick=quick),
        "coldpath": lambda quick: coldpath.run(quick=quick),
        "growth": lambda quick: growth.run(quick=quick),
        "gc": lambda quick: gc_hits.run(quick=quick),
        "http": http,
        "upstream": lambda quick: upstream.run(quick=quick),
        "events": lambda quick: events.run(quick=quick),
        "memory": lambda quick: memory.run(quick=quick),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> str:
    found = []
    for name in ("starlette", "jinja2", "uvicorn", "uvloop", "httptools", "h11", "growthbook"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    wrk = shutil.which("wrk")
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout
        found.append(out.split(" [", 1)[0].strip() or "wrk")
    return ", ".join(found)


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


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
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = _load()
    timings = []
    for name, section in sections.items():
        if args.only and name not in args.only:
            continue
        print(f"==> {name}", file=sys.stderr, flush=True)
        section_started = time.monotonic()
        rows.extend(asyncio.run(section(args.quick)))
        timings.append(f"{name} {time.monotonic() - section_started:.0f} s")
    print(
        f"personalize-middleware benchmarks{' (--quick)' if args.quick else ''}, {when}: "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs ({_cpu_model()}); load average {load_before} at the start, "
        f"{_load()} at the end; {time.monotonic() - started:.0f} s ({', '.join(timings)})"
    )
    print(_versions())
    print()
    print(format_table(rows))
    print()
    print(
        "Ratio: the median of the per-round ratios to the baseline measured in the same "
        "rounds. Spread: their interquartile range, then min-max, and the number of rounds."
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows_as_json(rows), out, indent=2)
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
