"""A MoEngage Personalize stand-in over real HTTP whose behaviour is switchable at run time.

::

    upstream = FaultyUpstream(workspace_id="WS", api_secret="s3cret")
    with upstream.serve():                       # uvicorn on 127.0.0.1:<free port>
        settings = PersonalizeSettings(..., base_url=upstream.base_url)   # ".../v1"
        upstream.set_fault(Fault.HANG, "fetch")  # only the fetch endpoint hangs
        ...
        await wait_until(lambda: upstream.calls("fetch") >= 3)

Per endpoint (``"fetch"``, ``"metadata"``, ``"events"``) the stand-in answers with one
``Fault``: valid spec-shaped answers (``OK``, each user gets their own variation, see
``title_for``), ``HANG`` (no answer until ``release()`` or the client leaves), ``TRICKLE``
(headers at once, then the body one byte at a time), ``ERROR_500``, ``ERROR_503``,
``RATE_LIMITED`` (429 with ``Retry-After``), ``MALFORMED_JSON`` (a truncated 200),
``HTML_ERROR`` (a proxy's 502 page), ``RESET`` (the TCP connection is reset: RST, not a
clean close), ``UNAUTHORIZED`` (401), ``BAD_REQUEST`` (400, the API's error fields) and
``SLOW`` (answers as ``OK`` after ``slow_delay`` seconds, unless the client left first:
then nothing is accepted). ``events_body_limit`` makes the events endpoint answer 413 to a
larger body, as the real API does.
With ``echo_credentials`` every error answer repeats the request's ``Authorization``
header and the decoded credentials, as a careless proxy might: nothing may pass them on.

Every request is recorded (``requests()``, ``calls()``) and validated against the
published spec when ``violations`` is read (a test's fixture should assert it is empty). Event
calls record their ``moe_event_uuid``s: ``attempted_uuids`` (in any events call) and
``accepted_uuids`` (a ``Counter`` of those in calls answered 200), so "delivered exactly
once" is ``set(accepted_uuids.values()) == {1}``.

The app runs on the server thread's own event loop; everything the test reads is guarded
by a ``threading.Lock`` and returned as a copy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.support.http_server import run_asgi_server
from tests.support.spec import SpecViolation, validate_request_parts

__all__ = [
    "ENDPOINTS",
    "Fault",
    "FaultyUpstream",
    "Recorded",
    "experience_for",
    "title_for",
    "wait_until",
]

ENDPOINTS = ("fetch", "metadata", "events")


class Fault(StrEnum):
    """How an endpoint of the stand-in behaves."""

    OK = "ok"
    HANG = "hang"
    TRICKLE = "trickle"
    ERROR_500 = "500"
    ERROR_503 = "503"
    RATE_LIMITED = "429"
    MALFORMED_JSON = "malformed-json"
    HTML_ERROR = "html-error"
    RESET = "reset"
    UNAUTHORIZED = "401"
    BAD_REQUEST = "400"
    SLOW = "slow"


@dataclass(frozen=True)
class Recorded:
    """One request as the stand-in saw it (``at`` is ``time.monotonic()`` on arrival)."""

    endpoint: str
    method: str
    path: str
    query: str
    body: Any
    fault: Fault
    client_port: int
    at: float
    size: int = 0


def title_for(who: str | None, key: str) -> str:
    """The ``title`` variable user ``who`` sees for ``key``: a mix-up is visible."""
    return f"{key}:{who}"


def experience_for(who: str | None, key: str, medium: str = "") -> dict[str, Any]:
    """A spec-shaped ``experiences[key]`` for ``who``, one variable of each data type;
    ``medium`` echoes the request's ``utm_medium`` (an answer depends on the context).

    Numbers and booleans arrive as strings, as the real API sends them (WIRE.md)."""
    variation = zlib.crc32(f"{who}/{key}".encode()) % 3 + 1
    return {
        "payload": {
            "title": {"value": title_for(who, key), "data_type": "string"},
            "medium": {"value": medium, "data_type": "string"},
            "count": {"value": str(variation * 10), "data_type": "number"},
            "ratio": {"value": f"{variation}.5", "data_type": "float"},
            "enabled": {"value": "true", "data_type": "boolean"},
            "config": {"value": json.dumps({"who": who, "key": key}), "data_type": "json"},
        },
        "experience_context": {
            "cid": f"cid-{key}",
            "experience": key,
            "moe_locale_id": "0",
            "moe_variation_id": str(variation),
            "audience_name": "All Users",
            "audience_id": "aud-1",
            "type": "Web Personalization",
        },
    }


async def wait_until(
    condition: Callable[[], bool], *, timeout: float = 10.0, message: str = "condition"
) -> None:
    """Poll ``condition`` (cheaply, yielding to the event loop) until it holds; fail the
    test with ``message`` after ``timeout`` seconds. For waiting on a real state change
    (a call arrived, the breaker opened), never for papering over a race."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.002)


HTML_ERROR_PAGE = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)
MALFORMED_BODY = b'{"experiences": {"hero": {"payload": {"title": {"value": "x", "data_ty'


class FaultyUpstream:
    """The stand-in. ``serve()`` runs it; ``set_fault()`` switches it while it runs."""

    def __init__(
        self,
        *,
        workspace_id: str,
        api_secret: str,
        retry_after: str = "1",
        trickle_interval: float = 0.05,
        trickle_duration: float = 30.0,
        ok_delay: tuple[float, float] = (0.0, 0.0),
        known_keys: tuple[str, ...] = (),
        echo_credentials: bool = False,
        slow_delay: float = 8.0,
        events_body_limit: int | None = None,
        key_statuses: dict[str, str] | None = None,
    ) -> None:
        self.workspace_id = workspace_id
        self.echo_credentials = echo_credentials
        self.api_secret = api_secret
        self.retry_after = retry_after
        self.trickle_interval = trickle_interval
        self.trickle_duration = trickle_duration
        self.ok_delay = ok_delay
        self.known_keys = known_keys
        self.slow_delay = slow_delay
        self.events_body_limit = events_body_limit
        #: Metadata statuses other than "Active", by key (a Paused one, say).
        self.key_statuses = dict(key_statuses or {})
        self.base_url = ""
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = dict.fromkeys(ENDPOINTS, Fault.OK)
        self._requests: list[Recorded] = []
        self._violations: list[str] = []
        self._unchecked: list[tuple[str, str, str, dict[str, str], bytes]] = []
        self._attempted: list[str] = []
        self._accepted: Counter[str] = Counter()
        self._hanging = 0
        # Created on the server's loop at start-up: hung handlers wait on it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None

    # -- control (from the test's thread) ------------------------------------------------

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Run on ``http://127.0.0.1:<port>``; yields (and sets) ``base_url`` (``.../v1``).
        On exit hung requests are released first, so shutdown never waits on them."""
        with run_asgi_server(self.app(), lifespan="on") as root:
            self.base_url = root + "/v1"
            try:
                yield self.base_url
            finally:
                self.release()

    def set_fault(self, fault: Fault, *endpoints: str) -> None:
        """Make ``endpoints`` (default: all three) behave as ``fault`` from now on.
        Leaving ``HANG`` or ``TRICKLE`` releases requests still held."""
        for endpoint in endpoints or ENDPOINTS:
            if endpoint not in ENDPOINTS:
                raise ValueError(f"unknown endpoint {endpoint!r}")
        with self._lock:
            for endpoint in endpoints or ENDPOINTS:
                self._faults[endpoint] = fault
        if fault not in (Fault.HANG, Fault.TRICKLE):
            self.release()

    def fault(self, endpoint: str) -> Fault:
        with self._lock:
            return self._faults[endpoint]

    def release(self) -> None:
        """Let every held request finish now: a hung one answers as its endpoint behaves
        now (``OK`` if it still hangs), a trickling one sends the rest of its body."""
        loop, event = self._loop, self._release
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                loop.call_soon_threadsafe(self._wake)

    def reset(self) -> None:
        """Back to ``OK`` everywhere, with nothing recorded."""
        self.set_fault(Fault.OK)
        with self._lock:
            self._requests.clear()
            self._violations.clear()
            self._unchecked.clear()
            self._attempted.clear()
            self._accepted.clear()

    # -- what happened -----------------------------------------------------------------------

    def requests(self, endpoint: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self._requests if endpoint is None or r.endpoint == endpoint]

    def calls(self, endpoint: str | None = None, fault: Fault | None = None) -> int:
        """How many requests arrived (at ``endpoint``, answered with ``fault``)."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if (endpoint is None or r.endpoint == endpoint)
                and (fault is None or r.fault == fault)
            )

    @property
    def violations(self) -> list[str]:
        """Spec violations of the requests received so far. Validation (a few ms each)
        happens here, on the reader's thread, not while the stand-in answers: it must not
        distort the timings a test measures."""
        with self._lock:
            unchecked, self._unchecked = self._unchecked, []
        found: list[str] = []
        for endpoint, method, url, headers, raw in unchecked:
            try:
                validate_request_parts(
                    method,
                    url,
                    headers,
                    raw,
                    workspace_id=self.workspace_id,
                    api_secret=self.api_secret,
                )
            except SpecViolation as exc:
                found.append(f"{endpoint}: {exc}")
        with self._lock:
            self._violations.extend(found)
            return list(self._violations)

    @property
    def attempted_uuids(self) -> list[str]:
        """Every ``moe_event_uuid`` of every events call, whatever the answer."""
        with self._lock:
            return list(self._attempted)

    @property
    def accepted_uuids(self) -> Counter[str]:
        """How many times each ``moe_event_uuid`` arrived in a call answered 200."""
        with self._lock:
            return Counter(self._accepted)

    @property
    def hanging(self) -> int:
        """Requests currently held by ``HANG`` or ``TRICKLE``."""
        with self._lock:
            return self._hanging

    # -- the app (on the server's thread) -------------------------------------------------

    def app(self) -> Any:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self._loop = asyncio.get_running_loop()
            self._release = asyncio.Event()
            yield
            self._wake()

        starlette = Starlette(
            routes=[
                Route("/v1/experiences/fetch", self._fetch, methods=["POST"]),
                Route("/v1/experiences/metadata", self._metadata, methods=["GET"]),
                Route("/v1/experiences/events", self._events, methods=["POST"]),
            ],
            lifespan=lifespan,
        )

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                # uvicorn's receive is a bound method of the request cycle, which holds
                # the connection's transport: RESET needs the raw socket.
                cycle = getattr(receive, "__self__", None)
                scope.setdefault("state", {})["transport"] = getattr(cycle, "transport", None)
            await starlette(scope, receive, send)

        return app

    def _wake(self) -> None:
        if self._release is not None:
            self._release.set()
            self._release = asyncio.Event()  # later hangs hang again

    async def _record(self, endpoint: str, request: Request) -> tuple[Any, Fault]:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        uuids = _event_uuids(body) if endpoint == "events" else []
        with self._lock:
            fault = self._faults[endpoint]
            self._unchecked.append(
                (endpoint, request.method, str(request.url), dict(request.headers), raw)
            )
            self._attempted.extend(uuids)
            self._requests.append(
                Recorded(
                    endpoint=endpoint,
                    method=request.method,
                    path=request.url.path,
                    query=request.url.query,
                    body=body,
                    fault=fault,
                    client_port=request.client.port if request.client else 0,
                    at=time.monotonic(),
                    size=len(raw),
                )
            )
        return body, fault

    async def _fetch(self, request: Request) -> Response:
        body, fault = await self._record("fetch", request)
        identifiers = body.get("identifiers") if isinstance(body, dict) else None
        keys = body.get("experience_key", list(self.known_keys)) if isinstance(body, dict) else None
        if not isinstance(identifiers, dict) or not isinstance(keys, list):
            # What the API answers a body it cannot read (the spec check flags it too).
            return _error(400, "Invalid Field Value", "identifiers / experience_key")
        user_identifiers = identifiers.get("user_identifiers")
        who = identifiers.get("customer_id") or (
            user_identifiers.get("u_em") if isinstance(user_identifiers, dict) else None
        )

        medium = body.get("utm_medium")
        medium = medium if isinstance(medium, str) else ""

        def answer() -> dict[str, Any]:
            return {
                "experiences": {str(key): experience_for(who, str(key), medium) for key in keys}
            }

        return await self._respond("fetch", fault, request, answer)

    async def _metadata(self, request: Request) -> Response:
        _, fault = await self._record("metadata", request)

        def answer() -> dict[str, Any]:
            entries = [
                {
                    "experience_name": key.title(),
                    "experience_key": key,
                    "status": self.key_statuses.get(key, "Active"),
                }
                for key in self.known_keys
            ]
            return {"metadata": {"count": len(entries), "experiences": entries}}

        return await self._respond("metadata", fault, request, answer)

    async def _events(self, request: Request) -> Response:
        body, fault = await self._record("events", request)
        limit = self.events_body_limit
        if limit is not None and len(await request.body()) > limit:
            return _error(413, "Payload Too Large", f"the body is over {limit} bytes")

        def answer() -> dict[str, Any]:
            with self._lock:
                self._accepted.update(_event_uuids(body))
            return {"status": "success", "message": "events accepted", "req_id": "req-1"}

        return await self._respond("events", fault, request, answer)

    async def _respond(
        self,
        endpoint: str,
        fault: Fault,
        request: Request,
        answer: Callable[[], dict[str, Any]],
    ) -> Response:
        if fault is Fault.OK:
            low, high = self.ok_delay
            if high > 0:
                await asyncio.sleep(random.uniform(low, high))
            return JSONResponse(answer())
        if fault is Fault.HANG:
            if not await self._hold(request):
                return Response(status_code=204)  # the client left: nobody reads this
            # Released: answer as the endpoint behaves now (OK if it still hangs).
            now = self.fault(endpoint)
            if now in (Fault.HANG, Fault.TRICKLE):
                now = Fault.OK
            return await self._respond(endpoint, now, request, answer)
        if fault is Fault.TRICKLE:
            return self._trickle(answer)
        if fault is Fault.SLOW:
            if not await self._wait_unless_gone(request, self.slow_delay):
                return Response(status_code=204)  # the client left: nobody reads this
            return await self._respond(endpoint, Fault.OK, request, answer)
        echo = self._echo(request)
        if fault is Fault.ERROR_500:
            return _error(500, "Internal Server Error", "something went wrong" + echo)
        if fault is Fault.ERROR_503:
            return _error(503, "Service Unavailable", "try again later" + echo)
        if fault is Fault.RATE_LIMITED:
            response = _error(429, "Too Many Requests", "rate limit exceeded" + echo)
            response.headers["Retry-After"] = self.retry_after
            return response
        if fault is Fault.MALFORMED_JSON:
            return Response(MALFORMED_BODY, 200, media_type="application/json")
        if fault is Fault.HTML_ERROR:
            return Response(HTML_ERROR_PAGE + echo, 502, media_type="text/html")
        if fault is Fault.UNAUTHORIZED:
            return _error(401, "Authentication required" + echo, "invalid credentials" + echo)
        if fault is Fault.BAD_REQUEST:
            return _error(400, "Invalid Field Value" + echo, "DAY_OF_THE_WEEK - bad" + echo)
        if fault is Fault.RESET:
            await _reset_connection(request)
            return Response(status_code=204)  # the connection is gone: nobody reads this
        raise AssertionError(f"unhandled fault {fault}")

    def _echo(self, request: Request) -> str:
        if not self.echo_credentials:
            return ""
        authorization = request.headers.get("authorization", "")
        try:
            credentials = base64.b64decode(authorization.partition(" ")[2]).decode()
        except ValueError:
            credentials = "?"
        return f" [you sent Authorization: {authorization}; credentials {credentials}]"

    async def _hold(self, request: Request) -> bool:
        """Wait until released (True) or until the client disconnects (False)."""
        assert self._release is not None
        released = asyncio.ensure_future(self._release.wait())
        left = asyncio.ensure_future(_disconnected(request))
        with self._lock:
            self._hanging += 1
        try:
            await asyncio.wait({released, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            with self._lock:
                self._hanging -= 1
            for task in (released, left):
                task.cancel()
        return released.done() and not released.cancelled()

    async def _wait_unless_gone(self, request: Request, seconds: float) -> bool:
        """Wait ``seconds``; False if the client disconnected first."""
        left = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({left}, timeout=seconds)
        finally:
            left.cancel()
        return not (left.done() and not left.cancelled())

    def _trickle(self, answer: Callable[[], dict[str, Any]]) -> Response:
        """Headers now, then a valid JSON body padded with whitespace, one byte per
        ``trickle_interval``, over ``trickle_duration`` (unless released sooner). A
        per-read timeout never fires: only an overall deadline stops it."""
        body = json.dumps(answer()).encode()
        padding = max(1, int(self.trickle_duration / self.trickle_interval))
        release = self._release
        assert release is not None

        async def dribble() -> AsyncIterator[bytes]:
            with self._lock:
                self._hanging += 1
            try:
                for _ in range(padding):
                    if release.is_set():
                        break
                    yield b" "
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(release.wait(), self.trickle_interval)
                yield body
            finally:
                with self._lock:
                    self._hanging -= 1

        return StreamingResponse(dribble(), media_type="application/json")


def _error(status: int, title: str, description: str) -> Response:
    return JSONResponse({"title": title, "description": description}, status)


async def _disconnected(request: Request) -> None:
    # The body was read already, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _reset_connection(request: Request) -> None:
    """Abort the TCP connection with an RST (SO_LINGER 0), then wait until uvicorn has
    noticed, so the response the route returns afterwards goes nowhere."""
    transport = request.scope.get("state", {}).get("transport")
    if transport is None:
        raise RuntimeError("RESET needs the stand-in to run under uvicorn")
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    await _disconnected(request)


def _event_uuids(body: Any) -> list[str]:
    uuids: list[str] = []
    elements = body.get("elements") if isinstance(body, dict) else None
    for element in elements if isinstance(elements, list) else ():
        actions = element.get("actions") if isinstance(element, dict) else None
        for action in actions if isinstance(actions, list) else ():
            if isinstance(action, dict) and isinstance(action.get("moe_event_uuid"), str):
                uuids.append(action["moe_event_uuid"])
    return uuids
