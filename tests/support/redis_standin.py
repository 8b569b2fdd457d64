"""A counting MoEngage Fetch stand-in for the Redis tests, served over real HTTP.

It answers ``POST /experiences/fetch`` like the API (every requested key matches, with a
payload naming the user), records when each call arrived, and can enforce the
workspace rate limit itself (a 429 when more than ``budget`` calls arrived in the last
``window`` seconds), so a test can prove the limiter kept every process under it.
``rules`` make one customer's calls slow or fail. ``versions[customer]`` is appended to
the title (read when the call arrives: a slow call answers what was true when it came in,
as after a login the API's old answer still may). ``statuses`` is what the metadata
endpoint reports (``GET /experiences/metadata``); a key whose status is set and not
``Active`` is not served, as MoEngage serves no paused experience. Run it with
``tests.support.http_server.run_asgi_server(standin.app)``; it lives on the server's
thread, so the counters are guarded by a ``threading.Lock``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["Rule", "Standin", "max_in_window"]


@dataclass
class Rule:
    """What the stand-in does for one customer: wait ``delay`` (or until ``gate`` is set),
    then answer ``status`` (200 = experiences) with ``headers``."""

    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    gate: threading.Event | None = None


def max_in_window(times: list[float], window: float) -> int:
    """The most calls in any rolling ``window`` (half-open) among sorted ``times``."""
    best, start = 0, 0
    ordered = sorted(times)
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


class Standin:
    def __init__(self, *, budget: int | None = None, window: float = 60.0) -> None:
        self.budget = budget
        self.window = window
        self.rules: dict[str, Rule] = {}
        self.versions: dict[str, str] = {}
        self.statuses: dict[str, str] = {}
        self.metadata_calls = 0
        self._lock = threading.Lock()
        self._times: list[float] = []
        self._customers: Counter[str] = Counter()
        self.rejected = 0
        self.rejections: list[float] = []
        self.app = Starlette(
            routes=[
                Route("/experiences/fetch", self._fetch, methods=["POST"]),
                Route("/experiences/metadata", self._metadata, methods=["GET"]),
            ]
        )

    def calls_for(self, customer_id: str) -> int:
        with self._lock:
            return self._customers[customer_id]

    @property
    def times(self) -> list[float]:
        """Arrival times (``time.monotonic``) of every call that was answered."""
        with self._lock:
            return list(self._times)

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._times)

    async def _fetch(self, request: Request) -> Response:
        now = time.monotonic()
        body: Any = await request.json()
        customer = str(body.get("identifiers", {}).get("customer_id"))
        with self._lock:
            if self.budget is not None:
                recent = sum(1 for t in self._times if t > now - self.window)
                if recent >= self.budget:
                    self.rejected += 1
                    self.rejections.append(now)
                    return JSONResponse(
                        {"title": "Too Many Requests", "description": "rate limit"},
                        status_code=429,
                        headers={"Retry-After": "1"},
                    )
            self._times.append(now)
            self._customers[customer] += 1
            rule = self.rules.get(customer)
            version = self.versions.get(customer)
            statuses = dict(self.statuses)
        if rule is not None:
            if rule.gate is not None:  # the test opens it from its own thread
                await asyncio.to_thread(rule.gate.wait, 30.0)
            if rule.delay:
                await asyncio.sleep(rule.delay)  # simulated upstream latency
            if rule.status != 200:
                return JSONResponse(
                    {"title": "error", "description": f"stand-in status {rule.status}"},
                    status_code=rule.status,
                    headers=rule.headers,
                )
        wanted = body.get("experience_key") or []
        keys = [k for k in wanted if statuses.get(k, "Active") == "Active"]
        title = f"hello {customer}" + (f" [{version}]" if version else "")
        return JSONResponse({"experiences": {key: _experience(key, title) for key in keys}})

    async def _metadata(self, request: Request) -> Response:
        with self._lock:
            self.metadata_calls += 1
            statuses = dict(self.statuses)
        entries = [
            {"experience_key": key, "experience_name": key.title(), "status": status}
            for key, status in statuses.items()
        ]
        return JSONResponse({"metadata": {"count": len(entries), "experiences": entries}})


def _experience(key: str, title: str) -> dict[str, Any]:
    return {
        "payload": {
            "title": {"value": title, "data_type": "string"},
            "count": {"value": "3", "data_type": "number"},
            "tags": {"value": [], "data_type": "json"},
        },
        "experience_context": {
            "cid": f"cid-{key}",
            "experience": key,
            "moe_locale_id": "0",
            "moe_variation_id": "1",
            "audience_name": "All",
            "audience_id": "a1",
            "type": "personalization",
        },
    }
