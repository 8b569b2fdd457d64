"""Cache hits over HTTP, paired: the plain page and the personalized pages served AT THE
SAME TIME, so whatever else the machine does hits them alike.

Four uvicorn servers (one worker each, ``--loop uvloop``; the whole run once with
``--http httptools`` and once with ``--http h11``) run side by side: the plain page, the
plain page again (an A/A check of the method: its ratio should be 1.00), the hand-written
floor and the full page (tag, 6 hooks, script). With ``taskset`` and two CPUs, all four
servers share CPU 0 and their load generators (one each, ``wrk`` or else the Python
``_loadgen``) share CPU 1. The scheduler gives the saturated servers equal CPU time, so
a round's ratio of requests/s is the inverse ratio of the CPU each request costs under
uvicorn. Every round loads all four at once for the same seconds; the figure is the
median of the per-round ratios to the plain server, with their spread.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx

from ._apps import USER_AGENT, visitor_cookie
from ._report import Row, Spread, paired
from ._serve import loop
from ._standin import free_port, wait_for_port

__all__ = ["HTTP_IMPLEMENTATIONS", "TARGET_RPS_RATIO", "run"]

TARGET_RPS_RATIO = 0.85
CONNECTIONS = 16
HTTP_IMPLEMENTATIONS = ("httptools", "h11")
#: server name -> page preset; "plain" is the baseline of every ratio.
SERVERS = {"plain": "plain", "plain twin": "plain", "floor": "floor", "full": "full"}
_LABELS = {
    "full": "full page (tag + 9 reads + 6 hooks + script)",
    "floor": "hand-written floor (dict lookup + one HMAC)",
    "plain twin": "plain page twin (A/A check of the method)",
}


def _pinned(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu)]
    return []


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux ``/proc``), else ``None``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _server(preset: str, http: str) -> Iterator[tuple[str, int]]:
    """The server's URL and process id (``taskset`` execs, so it is uvicorn's own)."""
    port = free_port()
    process = subprocess.Popen(
        [*_pinned(0), sys.executable, "-m", "benchmarks._serve", preset, str(port), http]
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}/", process.pid
    finally:
        process.terminate()
        process.wait(10)


def _headers() -> dict[str, str]:
    return {
        "Cookie": visitor_cookie(),
        "User-Agent": USER_AGENT,
        "Accept": "text/html,application/xhtml+xml",
    }


class _Load:
    """One load generator run against one server, started now, read with ``rps()``."""

    def __init__(self, url: str, seconds: float) -> None:
        headers = [f"{k}: {v}" for k, v in _headers().items()]
        self.wrk = shutil.which("wrk") is not None
        if self.wrk:
            args: list[str] = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s"]
            for header in headers:
                args += ["-H", header]
            args.append(url)
        else:
            args = [sys.executable, "-m", "benchmarks._loadgen", url, str(seconds)]
            args += [str(CONNECTIONS), *headers]
        self.process = subprocess.Popen(
            [*_pinned(1), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def rps(self) -> float:
        out, err = self.process.communicate(timeout=120)
        if self.process.returncode:
            raise RuntimeError(f"load generator failed:\n{out}\n{err}")
        if not self.wrk:
            result = json.loads(out)
            if result["errors"]:
                raise RuntimeError(f"load generator saw {result['errors']} errors")
            return float(result["requests"]) / float(result["seconds"])
        if "Non-2xx" in out or "Socket errors" in out:
            raise RuntimeError(f"wrk saw errors:\n{out}")
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if match is None:
            raise RuntimeError(f"unexpected wrk output:\n{out}")
        return float(match.group(1))


def _together(urls: dict[str, str], seconds: float) -> dict[str, float]:
    """Load every server at once for ``seconds``: requests/s of each."""
    loads = {name: _Load(url, seconds) for name, url in urls.items()}
    return {name: load.rps() for name, load in loads.items()}


def _check(url: str, preset: str) -> None:
    for _ in range(2):  # the first request fills the cache
        response = httpx.get(url, headers=_headers(), timeout=10)
        response.raise_for_status()
    if preset != "plain":
        assert "home-hero for" in response.text, f"{preset}: not a personalized page"
        assert "set-cookie" not in response.headers, "the visitor cookie was not accepted"
    if preset == "full":
        assert "data-pz-impression" in response.text, "no tracking hooks"


def _paired_run(
    http: str, seconds: float, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Requests/s and server CPU seconds of every server, per round."""
    rps: dict[str, list[float]] = {name: [] for name in SERVERS}
    cpu: dict[str, list[float]] = {name: [] for name in SERVERS}
    with ExitStack() as stack:
        servers = {name: stack.enter_context(_server(p, http)) for name, p in SERVERS.items()}
        urls = {name: url for name, (url, _) in servers.items()}
        for name, url in urls.items():
            _check(url, SERVERS[name])
        _together(urls, 1.0)  # warm-up: connections, first-call caches
        for _ in range(rounds):
            before = {name: _cpu_seconds(pid) for name, (_, pid) in servers.items()}
            for name, value in _together(urls, seconds).items():
                rps[name].append(value)
            for name, (_, pid) in servers.items():
                start, end = before[name], _cpu_seconds(pid)
                if start is not None and end is not None:
                    cpu[name].append(end - start)
    return rps, cpu


def _cpu_per_request_us(rps: list[float], cpu: list[float], seconds: float) -> float | None:
    if len(cpu) != len(rps):
        return None
    return statistics.median(c / (r * seconds) * 1e6 for r, c in zip(rps, cpu, strict=True))


def _cpu_text(us: float | None) -> str:
    return "" if us is None else f", {us:,.0f} µs server CPU each"


def _cpu_shares(cpu: dict[str, list[float]]) -> str:
    """How evenly the servers shared their CPU: the premise of the paired ratio."""
    totals = [sum(values) for values in cpu.values() if values]
    if len(totals) != len(cpu) or not min(totals):
        return ""
    return f"; CPU time per server within {max(totals) / min(totals) - 1:.1%} of each other"


def run(*, quick: bool) -> list[Row]:
    seconds, rounds = (2.0, 2) if quick else (5.0, 7)
    tool = "wrk" if shutil.which("wrk") else "Python load generator (httpx; understates)"
    pinning = (
        "servers together on CPU 0, load generators on CPU 1"
        if _pinned(0)
        else "not pinned (taskset or a second CPU missing)"
    )
    rows = []
    for http in HTTP_IMPLEMENTATIONS:
        rps, cpu = _paired_run(http, seconds, rounds)
        per_request = {n: _cpu_per_request_us(rps[n], cpu[n], seconds) for n in SERVERS}
        base = Spread(rps["plain"]).median
        shares = _cpu_shares(cpu)
        for name, label in _LABELS.items():
            spread = paired(rps[name], rps["plain"])
            row = Row(
                section=f"over HTTP, {loop()} + {http}",
                name=f"req/s, {label}",
                baseline=(
                    f"{base:,.0f} req/s{_cpu_text(per_request['plain'])} "
                    "(plain page, at the same time)"
                ),
                measured=f"{Spread(rps[name]).median:,.0f} req/s{_cpu_text(per_request[name])}",
                ratio=spread.median,
                spread=spread,
                data={
                    "baseline_rps": rps["plain"],
                    "measured_rps": rps[name],
                    "baseline_cpu_s": cpu["plain"],
                    "measured_cpu_s": cpu[name],
                },
            )
            if name == "full":
                row.target = f">= {TARGET_RPS_RATIO:.2f}x"
                row.met = spread.median >= TARGET_RPS_RATIO
                row.note = (
                    f"4 servers at once ({', '.join(SERVERS)}), one uvicorn worker each; "
                    f"{tool}, {CONNECTIONS} connections per server; {pinning}; {rounds} "
                    f"rounds of {seconds:g} s, ratio = median of the per-round ratios; server "
                    f"CPU per request from /proc (median of rounds){shares}"
                )
            rows.append(row)
    return rows
