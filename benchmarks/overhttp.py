"""Cache-hit overhead over HTTP: requests per second under uvicorn (one worker), with and
without the middleware, driven by ``wrk`` (or, without it, ``_loadgen.py``) from another
process. Where ``taskset`` and two CPUs exist, the server and the load generator each get
their own CPU, so they do not compete."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import httpx

from ._apps import USER_AGENT, visitor_cookie
from ._report import Row
from ._standin import free_port, wait_for_port

__all__ = ["TARGET_RPS_RATIO", "run"]

TARGET_RPS_RATIO = 0.9
CONNECTIONS = 16
_VARIANTS = ("baseline", "personalized", "direct")
_LABELS = {
    "personalized": "middleware + tag + tracking hooks, cache hit",
    "direct": "middleware only (page reads the handle), cache hit",
}


def _pinned(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu)]
    return []


@contextmanager
def _server(variant: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [*_pinned(0), sys.executable, "-m", "benchmarks._serve", variant, str(port)]
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


def _load(url: str, seconds: float) -> float:
    """Requests per second over ``seconds``."""
    headers = [f"{k}: {v}" for k, v in _headers().items()]
    if shutil.which("wrk"):
        args: list[str] = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s"]
        for header in headers:
            args += ["-H", header]
        out = subprocess.run(
            [*_pinned(1), *args, url], capture_output=True, text=True, check=True
        ).stdout
        if "Non-2xx" in out or "Socket errors" in out:
            raise RuntimeError(f"wrk saw errors:\n{out}")
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if match is None:
            raise RuntimeError(f"unexpected wrk output:\n{out}")
        return float(match.group(1))
    out = subprocess.run(
        [
            *_pinned(1),
            sys.executable,
            "-m",
            "benchmarks._loadgen",
            url,
            str(seconds),
            str(CONNECTIONS),
            *headers,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    if result["errors"]:
        raise RuntimeError(f"load generator saw {result['errors']} errors")
    return float(result["requests"]) / float(result["seconds"])


def _check(url: str, variant: str) -> None:
    response = httpx.get(url, headers=_headers(), timeout=10)
    response.raise_for_status()
    if variant != "baseline":
        assert "home-hero for" in response.text, f"{variant}: not a personalized cache hit"
        assert "set-cookie" not in response.headers, "the visitor cookie was not accepted"


def run(*, quick: bool, variants: Sequence[str] = _VARIANTS) -> list[Row]:
    seconds, rounds = (2.0, 2) if quick else (5.0, 5)
    tool = "wrk" if shutil.which("wrk") else "Python load generator (httpx)"
    rps: dict[str, list[float]] = {v: [] for v in variants}
    with _server(variants[0]) as u0, _server(variants[1]) as u1, _server(variants[2]) as u2:
        urls = dict(zip(variants, (u0, u1, u2), strict=True))
        for variant, url in urls.items():
            _check(url, variant)
            _load(url, 1.0)  # warm-up: connections, template compilation, L1
        for _ in range(rounds):
            for variant, url in urls.items():  # interleaved, so drift hits all alike
                rps[variant].append(_load(url, seconds))
    base = statistics.median(rps["baseline"])
    pinned = "server and load generator on separate CPUs" if _pinned(0) else "not pinned"
    rows = []
    for variant in variants[1:]:
        measured = statistics.median(rps[variant])
        ratio = measured / base
        rows.append(
            Row(
                section="over HTTP",
                name=f"uvicorn requests/s, {_LABELS[variant]}",
                baseline=f"{base:,.0f} req/s (page alone)",
                measured=f"{measured:,.0f} req/s",
                ratio=ratio,
                target=f">= {TARGET_RPS_RATIO:.2f}x" if variant == "personalized" else "",
                met=ratio >= TARGET_RPS_RATIO if variant == "personalized" else None,
                note=(
                    f"{tool}, {CONNECTIONS} connections, median of {rounds} interleaved "
                    f"{seconds:g} s runs; one uvicorn worker ({pinned})"
                ),
                data={"baseline_rps": rps["baseline"], "measured_rps": rps[variant]},
            )
        )
    return rows
