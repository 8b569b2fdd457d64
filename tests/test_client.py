"""PersonalizeClient over a real HTTP server on 127.0.0.1 (happy paths, faults, logging),
plus argument checks that need no server."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from personalize_middleware import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ConfigurationError,
    EventElement,
    MalformedResponseError,
    PersonalizeBackend,
    PersonalizeClient,
    PersonalizeSettings,
    RateLimitedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from personalize_middleware._retry import MAX_RETRY_AFTER, parse_retry_after
from tests.support.http_server import refused_url, run_asgi_server
from tests.support.spec import SpecViolation, validate_request_parts

pytestmark = pytest.mark.anyio

WORKSPACE = "WS_TEST_1"
SECRET = "s3cr3t-Zq9-never-log-me"
TOKEN = base64.b64encode(f"{WORKSPACE}:{SECRET}".encode()).decode()

Fault = Callable[[Request], Awaitable[Response]]


@dataclass
class Seen:
    method: str
    path: str
    query: str
    body: Any
    client_port: int


@dataclass
class StandIn:
    """A tiny MoEngage stand-in; every request it receives is validated against the spec."""

    seen: list[Seen] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    fault: Fault | None = None
    # When set, fetch handlers wait until this many fetches are in flight at once.
    barrier: int = 0
    _arrived: int = 0
    _all_in: asyncio.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        self.seen.clear()
        self.violations.clear()
        self.fault, self.barrier, self._arrived, self._all_in = None, 0, 0, None

    async def record(self, request: Request) -> Any:
        raw = await request.body()
        try:
            validate_request_parts(
                request.method,
                str(request.url),
                dict(request.headers),
                raw,
                workspace_id=WORKSPACE,
                api_secret=SECRET,
            )
        except SpecViolation as exc:
            self.violations.append(str(exc))
        body = json.loads(raw) if raw else None
        assert request.client is not None
        self.seen.append(
            Seen(request.method, request.url.path, request.url.query, body, request.client.port)
        )
        return body

    async def wait_for_peers(self) -> bool:
        """True once `barrier` fetches have arrived; False after 2 s (=> not concurrent)."""
        if self._all_in is None:  # created on the server's own loop
            self._all_in = asyncio.Event()
        self._arrived += 1
        if self._arrived >= self.barrier:
            self._all_in.set()
        try:
            await asyncio.wait_for(self._all_in.wait(), 2.0)
        except TimeoutError:
            return False
        return True

    async def fetch(self, request: Request) -> Response:
        body = await self.record(request)
        if self.fault:
            return await self.fault(request)
        if self.barrier and not await self.wait_for_peers():
            return JSONResponse({"title": "not concurrent", "description": "-"}, 500)
        return JSONResponse({"experiences": {k: _experience(k) for k in body["experience_key"]}})

    async def metadata(self, request: Request) -> Response:
        await self.record(request)
        if self.fault:
            return await self.fault(request)
        entries = [
            {"experience_name": "Banner", "experience_key": "banner", "status": "Active"},
            {"experience_name": "Strip", "experience_key": "strip", "status": "Paused"},
        ]
        return JSONResponse({"metadata": {"count": len(entries), "experiences": entries}})

    async def events(self, request: Request) -> Response:
        await self.record(request)
        if self.fault:
            return await self.fault(request)
        return JSONResponse({"status": "success", "message": "accepted", "req_id": "r1"})

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/experiences/fetch", self.fetch, methods=["POST"]),
                Route("/v1/experiences/metadata", self.metadata, methods=["GET"]),
                Route("/v1/experiences/events", self.events, methods=["POST"]),
            ]
        )


def _experience(key: str) -> dict[str, Any]:
    return {
        "payload": {"Title": {"value": f"title of {key}", "data_type": "string"}},
        "experience_context": {
            "cid": f"cid-{key}",
            "experience": key,
            "moe_locale_id": "0",
            "moe_variation_id": "1",
            "audience_name": "All Users",
            "audience_id": "5A",
            "type": "Web Personalization",
        },
    }


def _element(i: int, *, click: bool = False) -> EventElement:
    attributes: dict[str, Any] = dict(_experience(f"k{i}")["experience_context"])
    if click:
        attributes["b_id"] = "Add to Cart"
    return {
        "customer_id": f"user-{i}",
        "actions": [
            {
                "action": "MOE_PERSONALIZATION_MESSAGE_CLICKED"
                if click
                else "MOE_PERSONALIZATION_MESSAGE_SHOWN",
                "moe_event_uuid": f"aa886712-4537-47c1-b126-{i:012d}",
                "event_time": 1725258666,
                "platform": "web",
                "attributes": attributes,
            }
        ],
    }


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[StandIn, str]]:
    stand_in = StandIn()
    with run_asgi_server(stand_in.app()) as base_url:
        yield stand_in, base_url + "/v1"


@pytest.fixture
def stand_in(server: tuple[StandIn, str]) -> Iterator[StandIn]:
    stand_in, _ = server
    stand_in.reset()
    yield stand_in
    assert not stand_in.violations, stand_in.violations


def _settings(base_url: str, **overrides: Any) -> PersonalizeSettings:
    return PersonalizeSettings(
        workspace_id=WORKSPACE, api_secret=SECRET, base_url=base_url, **overrides
    )


@pytest.fixture
async def client(server: tuple[StandIn, str], stand_in: StandIn) -> Any:
    async with PersonalizeClient(_settings(server[1])) as client:
        yield client


# -- happy paths over the real server -------------------------------------------------------


async def test_implements_the_backend_protocol(client: PersonalizeClient) -> None:
    assert isinstance(client, PersonalizeBackend)


async def test_thirty_keys_cost_two_concurrent_calls(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    # The server holds each fetch until both are in flight: sequential calls would fail.
    stand_in.barrier = 2
    keys = [f"key-{i:02d}" for i in range(30)]
    result = await client.fetch_experiences(keys + keys[:3], customer_id="u1")
    assert sorted(result) == keys
    assert result["key-07"].get("Title") == "title of key-07"
    assert result["key-29"].experience_context["cid"] == "cid-key-29"
    sizes = sorted(len(s.body["experience_key"]) for s in stand_in.seen)
    assert sizes == [5, 25]
    sent = [k for s in stand_in.seen for k in s.body["experience_key"]]
    assert sorted(sent) == keys  # each key exactly once


async def test_hundred_fifty_elements_cost_two_event_calls(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    elements = [_element(i, click=(i == 149)) for i in range(150)]
    await client.track_events(elements)
    assert [len(s.body["elements"]) for s in stand_in.seen] == [100, 50]
    assert [s.body["elements"] for s in stand_in.seen] == [elements[:100], elements[100:]]


async def test_metadata_with_status_filter(client: PersonalizeClient, stand_in: StandIn) -> None:
    entries = await client.fetch_metadata(["Active", "Paused"])
    assert [(e.key, e.status, e.is_active) for e in entries] == [
        ("banner", "Active", True),
        ("strip", "Paused", False),
    ]
    assert stand_in.seen[0].query == "status=Active,Paused"


async def test_connections_are_kept_alive_and_reused(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    for _ in range(3):
        await client.fetch_metadata()
    await client.fetch_experiences(["a"], customer_id="u1")
    assert len({s.client_port for s in stand_in.seen}) == 1


async def test_no_keys_makes_no_call(client: PersonalizeClient, stand_in: StandIn) -> None:
    assert await client.fetch_experiences([], customer_id="u1") == {}
    await client.track_events([])
    assert stand_in.seen == []


# -- faults over the real server -------------------------------------------------------------


def _answer(
    status: int, body: bytes | str, content_type: str = "application/json", **headers: str
) -> Fault:
    async def fault(request: Request) -> Response:
        return Response(body, status, headers=headers, media_type=content_type)

    return fault


ERROR_BODY_400 = json.dumps(
    {"title": "Invalid Field Value", "description": "DAY_OF_THE_WEEK - bad", "code": "GvHogFKc"}
)
HTML = "<html><body><h1>502 Bad Gateway</h1></body></html>"


@pytest.mark.parametrize(
    ("fault", "expected", "status"),
    [
        (_answer(401, '{"title":"Authentication required","description":"bad key"}'),
         AuthenticationError, 401),
        (_answer(400, ERROR_BODY_400), BadRequestError, 400),
        (_answer(500, '{"title":"Internal","description":"oops"}'), UpstreamUnavailableError, 500),
        (_answer(503, HTML, "text/html"), UpstreamUnavailableError, 503),
        (_answer(200, '{"experiences": {"a": '), MalformedResponseError, 200),
        (_answer(200, HTML, "text/html"), MalformedResponseError, 200),
        (_answer(200, b""), MalformedResponseError, 200),
        (_answer(200, '{"experiences": ["a"]}'), MalformedResponseError, 200),
        (_answer(200, '{"experiences": {"a": "not an object"}}'), MalformedResponseError, 200),
        (_answer(200, '["experiences"]'), MalformedResponseError, 200),
        (_answer(404, "not found", "text/plain"), APIError, 404),
    ],
    ids=["401", "400", "500", "503-html", "truncated-json", "html-200", "empty", "list-shape",
         "item-shape", "top-level-list", "404"],
)  # fmt: skip
async def test_fetch_faults(
    client: PersonalizeClient,
    stand_in: StandIn,
    fault: Fault,
    expected: type[APIError],
    status: int,
) -> None:
    stand_in.fault = fault
    with pytest.raises(expected) as caught:
        await client.fetch_experiences(["a"], customer_id="u1")
    assert caught.type is expected  # not a broader or narrower class
    assert caught.value.status_code == status
    assert caught.value.endpoint == "POST /experiences/fetch"
    assert "/experiences/fetch" in str(caught.value)
    if status >= 400:
        assert str(status) in str(caught.value)


async def test_bad_request_carries_the_api_fields(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    stand_in.fault = _answer(400, ERROR_BODY_400)
    with pytest.raises(BadRequestError) as caught:
        await client.track_events([_element(1)])
    error = caught.value
    assert (error.title, error.description, error.code) == (
        "Invalid Field Value",
        "DAY_OF_THE_WEEK - bad",
        "GvHogFKc",
    )
    assert error.endpoint == "POST /experiences/events"
    assert not error.retryable


async def test_rate_limited_with_retry_after_seconds(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    stand_in.fault = _answer(429, "{}", **{"Retry-After": "7"})
    with pytest.raises(RateLimitedError) as caught:
        await client.fetch_metadata()
    assert caught.value.retry_after == 7.0
    assert caught.value.retryable


async def test_rate_limited_with_retry_after_http_date(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=40)
    stand_in.fault = _answer(429, "", **{"Retry-After": format_datetime(when, usegmt=True)})
    with pytest.raises(RateLimitedError) as caught:
        await client.fetch_experiences(["a"], customer_id="u1")
    assert caught.value.retry_after is not None
    assert 30 <= caught.value.retry_after <= 40


async def test_rate_limited_without_retry_after(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    stand_in.fault = _answer(429, "")
    with pytest.raises(RateLimitedError) as caught:
        await client.fetch_experiences(["a"], customer_id="u1")
    assert caught.value.retry_after is None


async def _hang_until_client_leaves(request: Request) -> Response:
    # Ends when httpx gives up and closes the connection: no sleep, no leftover task.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    return Response(status_code=204)


async def test_read_timeout(server: tuple[StandIn, str], stand_in: StandIn) -> None:
    stand_in.fault = _hang_until_client_leaves
    async with PersonalizeClient(_settings(server[1], read_timeout=0.2)) as client:
        with pytest.raises(UpstreamTimeoutError) as caught:
            await client.fetch_experiences(["a"], customer_id="u1")
    assert isinstance(caught.value.__cause__, httpx.TimeoutException)
    assert caught.value.endpoint == "POST /experiences/fetch"


async def test_connection_refused() -> None:
    with refused_url() as url:
        async with PersonalizeClient(_settings(url)) as client:
            with pytest.raises(UpstreamUnavailableError) as caught:
                await client.fetch_metadata()
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert caught.value.retryable


async def test_one_failing_chunk_fails_the_fetch_with_a_plain_api_error(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    async def second_chunk_unauthorized(request: Request) -> Response:
        if len(json.loads(await request.body())["experience_key"]) == 5:
            return Response('{"title":"Authentication required","description":"x"}', 401)
        return JSONResponse({"experiences": {}})

    stand_in.fault = second_chunk_unauthorized
    with pytest.raises(AuthenticationError):  # not an ExceptionGroup
        await client.fetch_experiences([f"k{i}" for i in range(30)], customer_id="u1")


async def test_secret_never_in_logs_or_errors(
    server: tuple[StandIn, str], stand_in: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # root: httpx, httpcore and ours
    messages: list[str] = []

    async def failing_call(client: PersonalizeClient) -> None:
        with pytest.raises(APIError) as caught:
            await client.fetch_metadata()
        error = caught.value
        messages.extend([str(error), repr(error), str(vars(error)), str(error.__cause__)])

    async with PersonalizeClient(_settings(server[1])) as client:
        messages.append(repr(client))
        await client.fetch_experiences(["a"], customer_id="u1")
        await client.track_events([_element(1)])
        # A proxy that echoes the credentials back in its error body.
        for fault in (
            _answer(401, json.dumps({"title": f"Basic {TOKEN}", "description": SECRET})),
            _answer(400, json.dumps({"title": SECRET, "description": TOKEN, "code": "c"})),
        ):
            stand_in.fault = fault
            await failing_call(client)
    stand_in.fault = _hang_until_client_leaves
    async with PersonalizeClient(_settings(server[1], read_timeout=0.2)) as client:
        await failing_call(client)
    with refused_url() as url:
        async with PersonalizeClient(_settings(url)) as client:
            await failing_call(client)
    loggers = {r.name for r in caplog.records}
    assert {"httpcore.http11", "httpx", "personalize_middleware.client"} <= loggers
    assert len(messages) == 1 + 4 * 4
    everything = caplog.text + "\n".join(messages)
    assert SECRET not in everything
    assert TOKEN not in everything
    assert "/experiences/metadata" in caplog.text


async def test_a_200_answer_quoting_the_secret_in_a_key_is_scrubbed(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    """Regression: a shape error's message quoted the answer's key (outside text) as is,
    and chained the model's ValueError, which repeated it, into the traceback."""
    stand_in.fault = _answer(200, json.dumps({"experiences": {f"k-{SECRET}": "not an object"}}))
    with pytest.raises(MalformedResponseError) as caught:
        await client.fetch_experiences(["a"], customer_id="u1")
    shown = "".join(traceback.format_exception(caught.value))
    assert SECRET not in shown and SECRET[:8] not in shown
    assert "********" in str(caught.value)
    assert isinstance(caught.value.__cause__, ValueError)  # still chained, scrubbed


async def test_error_text_from_the_answer_is_a_short_printable_snippet(
    client: PersonalizeClient, stand_in: StandIn
) -> None:
    title = "Denied\x1b[2J\r\nFAKE LOG LINE\u202e " + "x" * 5000
    stand_in.fault = _answer(401, json.dumps({"title": title, "description": "d" * 5000}))
    with pytest.raises(AuthenticationError) as caught:
        await client.fetch_experiences(["a"], customer_id="u1")
    message = str(caught.value)
    assert message.isprintable()  # no escape sequences, newlines or bidi overrides
    assert "Denied[2J FAKE LOG LINE x" in message
    assert len(message) < 600  # two fields of at most 200 characters, and our words


# -- no server needed ----------------------------------------------------------------------


def _offline() -> PersonalizeClient:
    def nope(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    return PersonalizeClient(_settings("http://127.0.0.1:9"), transport=httpx.MockTransport(nope))


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"keys": "homepage-banner", "customer_id": "u"}, "keys"),
        ({"keys": ["ok", ""], "customer_id": "u"}, "keys"),
        ({"keys": ["ok", 3], "customer_id": "u"}, "keys"),
        ({"keys": ["a"]}, "customer_id"),
        ({"keys": ["a"], "customer_id": "", "user_identifiers": {}}, "customer_id"),
        ({"keys": ["a"], "user_identifiers": {"u_em": 5}}, "user_identifiers"),
        ({"keys": ["a"], "customer_id": "u", "attributes": {"identifiers": "x"}}, "attributes"),
        ({"keys": ["a"], "customer_id": "u", "attributes": {"experience_key": []}}, "attributes"),
        ({"keys": ["a"], "customer_id": "u", "attributes": {"x": object()}}, "attributes"),
        ({"keys": ["a"], "customer_id": "u", "attributes": {"x": float("nan")}}, "attributes"),
    ],
)
async def test_fetch_argument_errors(kwargs: dict[str, Any], field_name: str) -> None:
    async with _offline() as client:
        with pytest.raises(ConfigurationError) as caught:
            await client.fetch_experiences(**kwargs)
    assert caught.value.field == field_name
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("statuses", [["active"], ["Active", "Archived"], "Active,paused"])
async def test_metadata_rejects_unknown_statuses(statuses: Any) -> None:
    async with _offline() as client:
        with pytest.raises(ConfigurationError, match="case-sensitive") as caught:
            await client.fetch_metadata(statuses)
    assert caught.value.field == "statuses"


async def test_events_reject_a_single_element() -> None:
    async with _offline() as client:
        with pytest.raises(ConfigurationError):
            await client.track_events(_element(1))  # type: ignore[arg-type]


async def test_closed_client_refuses_calls() -> None:
    client = _offline()
    await client.aclose()
    await client.aclose()  # idempotent
    assert client.is_closed
    with pytest.raises(ClientClosedError, match="closed"):
        await client.fetch_metadata()


async def test_decoding_error_is_a_malformed_response() -> None:
    def gzip_lie(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not gzip", headers={"Content-Encoding": "gzip"})

    settings = _settings("http://127.0.0.1:9")
    async with PersonalizeClient(settings, transport=httpx.MockTransport(gzip_lie)) as client:
        with pytest.raises(MalformedResponseError) as caught:
            await client.fetch_metadata()
    assert isinstance(caught.value.__cause__, httpx.DecodingError)


def test_repr_masks_the_secret() -> None:
    text = repr(_offline())
    assert WORKSPACE in text
    assert SECRET not in text and TOKEN not in text


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("12", 12.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("86400", MAX_RETRY_AFTER),
        ("inf", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date_is_relative_to_now() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(header, now=now.timestamp()) == 90.0
