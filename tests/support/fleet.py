"""Serve ``tests.support.fleet_app`` with several worker processes and talk to them.

``serve_fleet(server, workers, env)`` starts ``gunicorn`` (``--preload``, uvicorn workers) or
``uvicorn --workers`` on a socket bound here, waits until every worker has answered, and
stops the server (SIGTERM: graceful, lifespan shutdown included) when the block ends.
Requests go over fresh connections, so the kernel spreads them over the workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import httpx

from tests.support.tracking_helpers import BROWSER_USER_AGENT

__all__ = ["Fleet", "serve_fleet"]

ROOT = Path(__file__).resolve().parents[2]


class Fleet:
    def __init__(self, base: str, proc: subprocess.Popen[bytes], workers: int) -> None:
        self.base = base
        self.proc = proc
        self.workers = workers

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base,
            limits=httpx.Limits(max_keepalive_connections=0),  # a new connection each time
            timeout=20.0,
            headers={"user-agent": BROWSER_USER_AGENT},  # httpx's own is a crawler's
        )

    def page(self, client: httpx.Client, user: str) -> dict[str, Any]:
        response = client.get("/", headers={"X-User": user})
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    def each_worker(self, client: httpx.Client, path: str = "/healthz") -> dict[int, Any]:
        """One answer of ``path`` from every worker (asked until all have answered)."""
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + 30
        while len(answers) < self.workers:
            assert time.monotonic() < deadline, f"only {len(answers)} workers answered"
            data = client.get(path).json()
            answers[data["pid"]] = data
        return answers


@contextmanager
def serve_fleet(
    server: Literal["gunicorn", "uvicorn"], workers: int, env: dict[str, str]
) -> Iterator[Fleet]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    port = sock.getsockname()[1]
    fd = sock.fileno()
    if server == "gunicorn":
        args = [
            "-m",
            "gunicorn",
            "--preload",
            "-w",
            str(workers),
            "-k",
            "uvicorn.workers.UvicornWorker",
            "-b",
            f"fd://{fd}",
            "--graceful-timeout",
            "10",
            "--log-level",
            "warning",
        ]
    else:
        args = ["-m", "uvicorn", "--fd", str(fd), "--workers", str(workers)]
        args += ["--log-level", "warning"]
    proc = subprocess.Popen(
        [sys.executable, *args, "tests.support.fleet_app:app"],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning", **env},
        pass_fds=[fd],
    )
    sock.close()  # the server holds it now
    fleet = Fleet(f"http://127.0.0.1:{port}", proc, workers)
    try:
        with fleet.client() as client:
            deadline = time.monotonic() + 60
            pids: set[int] = set()
            while len(pids) < workers:
                assert proc.poll() is None, f"{server} exited with {proc.returncode}"
                assert time.monotonic() < deadline, f"only {len(pids)} workers answered"
                try:
                    pids.add(client.get("/healthz").json()["pid"])
                except httpx.TransportError:
                    time.sleep(0.05)  # not accepting yet
        yield fleet
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
