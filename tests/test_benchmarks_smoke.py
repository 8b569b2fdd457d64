"""The benchmark script runs: every section's own checks (each timed hit is a hit, every
page carries its user's content, one upstream call per cold miss...) pass in a quick
run. Not a timing test: the figures are not judged here, only that the script that
makes them still measures what it says (a broken section went unnoticed once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("inprocess", "coldpath", "growth", "gc", "upstream", "events")


@pytest.mark.slow
def test_a_quick_benchmark_run_completes_every_section(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(figures)]
    for section in SECTIONS:
        command += ["--only", section]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Exit status 1 also means "a target was missed": the table says which.
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert done.returncode in (0, 1), done.stderr[-3000:]
    rows = json.loads(figures.read_text())
    assert {row["section"] for row in rows} >= {
        "hit",
        "cold path",
        "growth",
        "gc",
        "cold miss",
        "events",
    }, sorted({row["section"] for row in rows})
    missed = [row["name"] for row in rows if row["met"] is False]
    assert (done.returncode == 1) == bool(missed), (done.returncode, missed)
    for row in rows:
        assert row["ratio"] is None or row["ratio"] > 0, row
