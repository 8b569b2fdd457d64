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


@contextmanager
def _server(preset: str, http: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [*_pinned(0), sys.executable, "-m", "benchmarks._serve", preset, str(port), http]
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}/"
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


def _paired_run(http: str, seconds: float, rounds: int) -> dict[str, list[float]]:
    rps: dict[str, list[float]] = {name: [] for name in SERVERS}
    with ExitStack() as stack:
        urls = {name: stack.enter_context(_server(p, http)) for name, p in SERVERS.items()}
        for name, url in urls.items():
            _check(url, SERVERS[name])
        _together(urls, 1.0)  # warm-up: connections, first-call caches
        for _ in range(rounds):
            for name, value in _together(urls, seconds).items():
                rps[name].append(value)
    return rps


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
        rps = _paired_run(http, seconds, rounds)
        base = Spread(rps["plain"]).median
        for name, label in _LABELS.items():
            spread = paired(rps[name], rps["plain"])
            row = Row(
                section=f"over HTTP, {loop()} + {http}",
                name=f"req/s, {label}",
                baseline=f"{base:,.0f} req/s (plain page, at the same time)",
                measured=f"{Spread(rps[name]).median:,.0f} req/s",
                ratio=spread.median,
                spread=spread,
                data={"baseline_rps": rps["plain"], "measured_rps": rps[name]},
            )
            if name == "full":
                row.target = f">= {TARGET_RPS_RATIO:.2f}x"
                row.met = spread.median >= TARGET_RPS_RATIO
                row.note = (
                    f"4 servers at once ({', '.join(SERVERS)}), one uvicorn worker each; "
                    f"{tool}, {CONNECTIONS} connections per server; {pinning}; {rounds} "
                    f"rounds of {seconds:g} s, ratio = median of the per-round ratios"
                )
            rows.append(row)
    return rows
