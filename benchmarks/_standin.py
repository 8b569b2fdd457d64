"""A MoEngage stand-in over real HTTP, in its own process, with a settable latency.

``python -m benchmarks._standin PORT`` serves the three endpoints the client calls under
``/v1`` (fetch answers every requested key, events answer success) and a control
endpoint, ``/_control``: ``GET`` returns the counters, ``POST {"delay": s}`` sets the
fetch latency and resets the counters. ``StandIn`` starts and stops it from the
benchmark.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from types import TracebackType
from typing import Any, Self

import httpx

from ._apps import experience_body

__all__ = ["StandIn", "free_port", "wait_for_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class _State:
    def __init__(self) -> None:
        self.delay = 0.0
        self.fetch_calls = 0
        self.fetch_users: set[str] = set()
        self.event_calls = 0
        self.event_elements = 0
        self.event_actions = 0


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _reply(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def make_app() -> Any:
    state = _State()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        body = await _body(receive)
        if method == "POST" and path.startswith("/v1/"):
            try:
                request = json.loads(body)
            except ValueError:  # a client gone mid-request (shutdown): nothing to answer
                await _reply(send, 400, b'{"title":"bad request"}')
                return
        if path == "/v1/experiences/fetch":
            state.fetch_calls += 1
            who = str(request["identifiers"].get("customer_id", "someone"))
            state.fetch_users.add(who)
            if state.delay:
                await asyncio.sleep(state.delay)
            await _reply(send, 200, experience_body(request.get("experience_key", []), who))
        elif path == "/v1/experiences/events":
            elements = request["elements"]
            state.event_calls += 1
            state.event_elements += len(elements)
            state.event_actions += sum(len(e["actions"]) for e in elements)
            await _reply(send, 200, b'{"status":"success","message":"ok","req_id":"r"}')
        elif path == "/v1/experiences/metadata":
            await _reply(send, 200, b'{"metadata":{"count":0,"experiences":[]}}')
        elif path == "/_control" and method == "POST":
            fresh = _State()
            fresh.delay = float(json.loads(body)["delay"])
            state.__dict__.update(fresh.__dict__)
            await _reply(send, 200, b"{}")
        elif path == "/_control":
            counters = {k: v for k, v in vars(state).items() if k != "fetch_users"}
            counters["fetch_users"] = len(state.fetch_users)
            await _reply(send, 200, json.dumps(counters).encode())
        else:
            await _reply(send, 404, b'{"title":"not found"}')

    return app


class StandIn:
    """The stand-in server in a subprocess, for a ``with`` block."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._process: subprocess.Popen[bytes] | None = None
        self._control = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._standin", str(self.port)]
        )
        wait_for_port(self.port)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._control.close()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)

    def reset(self, *, delay: float) -> None:
        """Set the fetch latency and zero the counters."""
        self._control.post("/_control", json={"delay": delay}).raise_for_status()

    def counters(self) -> dict[str, Any]:
        response = self._control.get("/_control")
        response.raise_for_status()
        return dict(response.json())


def main() -> None:
    import uvicorn

    uvicorn.run(
        make_app(),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
