"""OpenTelemetry through the real middleware, the real client and a stand-in MoEngage over
real HTTP; spans are read from the SDK's ``InMemorySpanExporter``.

Per page: one ``personalize.page`` span with one ``feature_flag.evaluation`` event per key
(key, variant, provider ``moengage``, reason); per HTTP call to MoEngage one CLIENT span,
the page's child; each accepted impression or click an event on the beacon request's span.
"""

from __future__ import annotations

import html
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jinja2
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from personalize_middleware import (
    ConfigurationError,
    Identity,
    OpenTelemetry,
    PersonalizeMiddleware,
    PersonalizeSettings,
    Telemetry,
    TrackingLimits,
    TrackingOptions,
    setup_templates,
)
from personalize_middleware.upstream import CircuitBreaker
from tests.support.faulty_upstream import Fault, FaultyUpstream, experience_for, wait_until
from tests.support.http_server import run_asgi_server
from tests.support.tracking_helpers import API_SECRET, WORKSPACE_ID, EventsStandIn
from tests.support.tracking_helpers import beacon as beacon_body

pytestmark = pytest.mark.anyio

WORKSPACE = "WS_OTEL"
SECRET = "otel-suite-api-secret-Xy7"
SIGNING_KEY = "otel-suite-signing-key-0123456789"
KEYS = ("hero", "promo")
BUDGET = 0.25
TTL = 30.0
SWR = 10.0


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


async def waits(request: Request) -> Response:
    handle = request.state.personalize
    await handle.wait()
    return JSONResponse({key: handle.value(key, "title", "default") for key in handle.keys})


async def does_not_wait(request: Request) -> Response:
    handle = request.state.personalize
    return JSONResponse({key: handle.value(key, "title", "default") for key in handle.keys})


class Traced:
    """The page app behind PersonalizeMiddleware(telemetry=OpenTelemetry(...)), requests in
    process, the upstream over HTTP; every finished span lands in ``exporter``."""

    def __init__(
        self, base_url: str, routes: dict[str, list[str]], *, sampler: Any = None, **options: Any
    ) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=sampler)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        options.setdefault("metadata_refresh", None)
        options.setdefault("tracking", False)
        self.middleware = PersonalizeMiddleware(
            Starlette(routes=[Route("/", waits), Route("/eager", does_not_wait)]),
            settings=PersonalizeSettings(
                workspace_id=options.pop("workspace_id", WORKSPACE),
                api_secret=options.pop("api_secret", SECRET),
                base_url=base_url,
                read_timeout=0.4,
                connect_timeout=0.5,
            ),
            routes=routes,
            identify=header_identity,
            secret_key=SIGNING_KEY,
            latency_budget=BUDGET,
            cache_ttl=TTL,
            stale_while_revalidate=SWR,
            stale_if_error=3600,
            breaker=CircuitBreaker(threshold=50),
            telemetry=OpenTelemetry(tracer_provider=self.provider),
            **options,
        )
        self.store = self.middleware.store
        self._age = 0.0
        self.store.clock = lambda: time.time() + self._age
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.middleware), base_url="http://shop.test"
        )

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.middleware.shutdown()
        self.provider.shutdown()

    def age_cache(self, seconds: float) -> None:
        self._age += seconds

    async def page(self, user: str, path: str = "/") -> dict[str, str]:
        response = await self.client.get(path, headers={"x-user": user})
        assert response.status_code == 200, response.text
        titles: dict[str, str] = response.json()
        return titles

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def only_page(self) -> ReadableSpan:
        (page,) = self.spans("personalize.page")
        return page

    def evaluations(self, span: ReadableSpan) -> dict[str, dict[str, Any]]:
        found = {}
        for event in span.events:
            assert event.name == "feature_flag.evaluation"
            attributes = dict(event.attributes or {})
            assert attributes.pop("feature_flag.provider.name") == "moengage"
            found[attributes.pop("feature_flag.key")] = attributes
        return found

    def reasons(self, span: ReadableSpan) -> dict[str, str]:
        return {k: a["feature_flag.result.reason"] for k, a in self.evaluations(span).items()}

    def clear(self) -> None:
        self.exporter.clear()


def variant(user: str, key: str) -> str:
    return str(experience_for(user, key)["experience_context"]["moe_variation_id"])


@pytest.fixture(scope="module")
def served() -> Iterator[FaultyUpstream]:
    upstream = FaultyUpstream(workspace_id=WORKSPACE, api_secret=SECRET, known_keys=KEYS)
    with upstream.serve():
        yield upstream


@pytest.fixture
def upstream(served: FaultyUpstream) -> Iterator[FaultyUpstream]:
    served.reset()
    yield served
    violations = served.violations
    served.reset()
    assert violations == []


@pytest.fixture
async def site(upstream: FaultyUpstream) -> AsyncIterator[Traced]:
    traced = Traced(upstream.base_url, {"/": list(KEYS), "/eager": list(KEYS)})
    yield traced
    await traced.aclose()


# -- pages ----------------------------------------------------------------------------------


async def test_a_cold_page_has_one_evaluation_per_key_and_its_fetch_as_a_child(
    site: Traced,
) -> None:
    assert await site.page("u1") == {key: f"{key}:u1" for key in KEYS}
    page = site.only_page()
    assert site.evaluations(page) == {
        key: {
            "feature_flag.result.reason": "targeting_match",
            "feature_flag.result.variant": variant("u1", key),
        }
        for key in KEYS
    }
    assert page.attributes is not None and list(page.attributes["personalize.keys"]) == list(KEYS)  # type: ignore[arg-type]
    (call,) = site.spans("POST /experiences/fetch")
    assert call.kind is SpanKind.CLIENT
    assert call.parent is not None and page.context is not None and call.context is not None
    assert call.parent.span_id == page.context.span_id
    assert call.context.trace_id == page.context.trace_id
    assert dict(call.attributes or {}) == {
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "personalize.endpoint": "fetch",
        "feature_flag.provider.name": "moengage",
    }
    assert call.status.status_code is StatusCode.UNSET
    # The page span covers the request from its start to the end of the wait.
    assert page.start_time is not None and call.start_time is not None
    assert page.end_time is not None and call.end_time is not None
    assert page.start_time <= call.start_time and call.end_time <= page.end_time


async def test_a_cached_page_says_cached_and_calls_nobody(site: Traced) -> None:
    await site.page("u1")
    site.clear()
    assert await site.page("u1") == {key: f"{key}:u1" for key in KEYS}
    page = site.only_page()
    assert site.reasons(page) == dict.fromkeys(KEYS, "cached")
    assert site.evaluations(page)["hero"]["feature_flag.result.variant"] == variant("u1", "hero")
    assert site.spans("POST /experiences/fetch") == []


async def test_stale_while_revalidate_says_stale_and_its_refresh_is_the_pages_child(
    site: Traced, upstream: FaultyUpstream
) -> None:
    await site.page("u1")
    site.age_cache(TTL + 1)  # past fresh, inside stale-while-revalidate
    site.clear()
    await site.page("u1")
    await wait_until(lambda: len(site.spans("POST /experiences/fetch")) == 1, message="refresh")
    page = site.only_page()
    assert site.reasons(page) == dict.fromkeys(KEYS, "stale")
    (refresh,) = site.spans("POST /experiences/fetch")
    assert refresh.parent is not None and page.context is not None
    assert refresh.parent.span_id == page.context.span_id


async def test_an_upstream_500_serves_stale_if_error_and_the_call_span_says_why(
    site: Traced, upstream: FaultyUpstream
) -> None:
    await site.page("u1")
    site.age_cache(TTL + SWR + 1)  # only stale-if-error is left
    upstream.set_fault(Fault.ERROR_500, "fetch")
    site.clear()
    assert await site.page("u1") == {key: f"{key}:u1" for key in KEYS}
    assert site.reasons(site.only_page()) == dict.fromkeys(KEYS, "stale")
    (call,) = site.spans("POST /experiences/fetch")
    attributes = dict(call.attributes or {})
    assert attributes["http.response.status_code"] == 500
    assert attributes["error.type"] == "UpstreamUnavailableError"
    assert attributes["personalize.outcome"] == "unavailable"
    assert call.status.status_code is StatusCode.ERROR
    assert SECRET not in str(call.status.description)


async def test_a_cold_user_during_an_outage_gets_error(
    site: Traced, upstream: FaultyUpstream
) -> None:
    upstream.set_fault(Fault.ERROR_503, "fetch")
    assert await site.page("u2") == dict.fromkeys(KEYS, "default")
    evaluations = site.evaluations(site.only_page())
    assert evaluations == {key: {"feature_flag.result.reason": "error"} for key in KEYS}


async def test_a_hung_upstream_past_the_budget_is_an_error_and_its_call_ends_as_a_timeout(
    site: Traced, upstream: FaultyUpstream
) -> None:
    upstream.set_fault(Fault.HANG, "fetch")
    started = time.monotonic()
    assert await site.page("u3") == dict.fromkeys(KEYS, "default")
    assert time.monotonic() - started < BUDGET + 0.5
    assert site.reasons(site.only_page()) == dict.fromkeys(KEYS, "error")
    # The call goes on past the page (it would fill the cache) until the client's deadline.
    await wait_until(lambda: len(site.spans("POST /experiences/fetch")) == 1, message="timeout")
    (call,) = site.spans("POST /experiences/fetch")
    assert dict(call.attributes or {})["error.type"] == "UpstreamTimeoutError"
    assert "http.response.status_code" not in dict(call.attributes or {})


async def test_a_page_that_does_not_wait_reports_its_keys_as_default(
    site: Traced, upstream: FaultyUpstream
) -> None:
    upstream.set_fault(Fault.HANG, "fetch")  # the answer cannot beat the response
    assert await site.page("u4", "/eager") == dict.fromkeys(KEYS, "default")
    assert site.reasons(site.only_page()) == dict.fromkeys(KEYS, "default")


async def test_a_key_that_is_not_active_in_the_workspace_is_disabled(
    upstream: FaultyUpstream,
) -> None:
    site = Traced(upstream.base_url, {"/": [*KEYS, "retired"]}, metadata_refresh=60)
    try:
        await site.page("warm-up")  # starts the middleware and its metadata watcher
        watcher = site.middleware.metadata
        assert watcher is not None
        await wait_until(lambda: watcher.statuses is not None, message="metadata")
        # The metadata call at start-up has its span too (no page: a root span).
        await wait_until(lambda: bool(site.spans("GET /experiences/metadata")), message="span")
        (metadata,) = site.spans("GET /experiences/metadata")
        assert metadata.parent is None
        assert dict(metadata.attributes or {})["http.response.status_code"] == 200
        site.clear()
        await site.page("u5")
        assert site.reasons(site.only_page()) == {
            "hero": "targeting_match",
            "promo": "targeting_match",
            "retired": "disabled",
        }
    finally:
        await site.aclose()


async def test_a_user_matching_no_variation_gets_default_without_a_variant() -> None:
    standin = EventsStandIn({"hero": {"title": "Hi"}})
    with run_asgi_server(standin.app()) as root:
        site = Traced(
            root + "/v1",
            {"/": ["hero", "not-for-you"]},
            workspace_id=WORKSPACE_ID,
            api_secret=API_SECRET,
        )
        try:
            assert await site.page("u6") == {"hero": "Hi", "not-for-you": "default"}
            assert site.evaluations(site.only_page()) == {
                "hero": {
                    "feature_flag.result.reason": "targeting_match",
                    "feature_flag.result.variant": "2",
                },
                "not-for-you": {"feature_flag.result.reason": "default"},
            }
        finally:
            await site.aclose()
    assert standin.violations == []


async def test_a_page_asking_for_nothing_makes_no_span(site: Traced) -> None:
    response = await site.client.get("/nothing-here", headers={"x-user": "u7"})
    assert response.status_code == 404
    assert site.exporter.get_finished_spans() == ()


# -- impressions and clicks -----------------------------------------------------------------

PAGE = """\
{% experience "hero" as hero %}<section{{ impression(hero) }}>{{ hero.title }}\
<button{{ track_click(hero, "Add to Cart") }}>Add</button></section>{% endexperience %}\
{{ personalize_script() }}"""


class ServerSpan:
    """What OpenTelemetry's ASGI instrumentation does: a SERVER span current for the request."""

    def __init__(self, app: ASGIApp, provider: TracerProvider) -> None:
        self.app = app
        self.tracer = provider.get_tracer("test-asgi")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name = f"{scope['method']} {scope['path']}"
        with self.tracer.start_as_current_span(name, kind=SpanKind.SERVER):
            await self.app(scope, receive, send)


def tracked_site(base_url: str, provider: TracerProvider, *, server_span: bool) -> Starlette:
    templates = Jinja2Templates(
        env=jinja2.Environment(
            loader=jinja2.DictLoader({"page.html": PAGE}), autoescape=jinja2.select_autoescape()
        )
    )
    setup_templates(templates)

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html")

    middleware = [
        Middleware(
            PersonalizeMiddleware,
            settings=PersonalizeSettings(
                workspace_id=WORKSPACE_ID, api_secret=API_SECRET, base_url=base_url
            ),
            routes={"/": ["hero"]},
            identify=header_identity,
            secret_key=SIGNING_KEY,
            metadata_refresh=None,
            telemetry=OpenTelemetry(tracer_provider=provider),
            # The tests' beacons follow their page at once: the human timing is not tested.
            tracking=TrackingOptions(limits=TrackingLimits.off()),
        )
    ]
    if server_span:
        middleware.insert(0, Middleware(ServerSpan, provider=provider))
    return Starlette(routes=[Route("/", page)], middleware=middleware)


def tokens(text: str) -> list[str]:
    return [html.unescape(v) for v in re.findall(r' data-pz-(?:impression|click)="([^"]*)"', text)]


def beacon(client: TestClient, page: str, found: list[str]) -> int:
    return client.post(
        "/_personalize/events",
        json=beacon_body(page, found),
        headers={"origin": "http://testserver", "sec-fetch-site": "same-origin"},
    ).status_code


def test_impressions_and_clicks_are_events_on_the_beacon_requests_span() -> None:
    standin = EventsStandIn({"hero": {"title": "Hi"}})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with run_asgi_server(standin.app()) as root:
        app = tracked_site(root + "/v1", provider, server_span=True)
        with TestClient(app, headers={"x-user": "u-42"}) as client:
            page = client.get("/").text
            found = tokens(page)
            assert len(found) == 2
            assert beacon(client, page, found) == 204
            assert beacon(client, page, found) == 204  # a replay: not forwarded again
        # Leaving ran the shutdown: the batcher delivered, and that call has its span.
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server = [s for s in exporter.get_finished_spans() if s.name == "POST /_personalize/events"]
    assert len(server) == 2
    events = [(e.name, dict(e.attributes or {})) for e in server[0].events]
    common = {
        "feature_flag.key": "hero",
        "feature_flag.provider.name": "moengage",
        "feature_flag.result.variant": "2",
    }
    assert events == [
        ("personalize.impression", {**common, "personalize.event.kind": "impression"}),
        (
            "personalize.click",
            {**common, "personalize.event.kind": "click", "personalize.event.b_id": "Add to Cart"},
        ),
    ]
    assert server[1].events == ()  # the replay was dropped before the recorder forwarded it
    # The page itself: the page span is a child of the request's server span.
    page, get = spans["personalize.page"], spans["GET /"]
    assert page.parent is not None and get.context is not None
    assert page.parent.span_id == get.context.span_id
    delivery = spans["POST /experiences/events"]
    assert dict(delivery.attributes or {})["http.response.status_code"] == 200
    assert len(standin.delivered) == 2
    assert standin.violations == []


def test_without_a_current_span_an_accepted_event_gets_a_span_of_its_own() -> None:
    standin = EventsStandIn({"hero": {"title": "Hi"}})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with run_asgi_server(standin.app()) as root:
        app = tracked_site(root + "/v1", provider, server_span=False)
        with TestClient(app, headers={"x-user": "u-43"}) as client:
            page = client.get("/").text
            found = tokens(page)
            assert beacon(client, page, found[:1]) == 204
    (own,) = [s for s in exporter.get_finished_spans() if s.name == "personalize.event"]
    ((name, attributes),) = [(e.name, dict(e.attributes or {})) for e in own.events]
    assert name == "personalize.impression"
    assert attributes["feature_flag.key"] == "hero"


# -- the protocol, the extra -----------------------------------------------------------------


def test_without_opentelemetry_installed_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import fails as when absent
    with pytest.raises(ConfigurationError, match=r"personalize-middleware\[otel\]"):
        OpenTelemetry()


@pytest.mark.parametrize(
    ("telemetry", "message"),
    [
        (OpenTelemetry, "pass an instance"),
        ("prometheus", "str is not a Telemetry"),
        ([object()], "object is not a Telemetry"),
    ],
)
def test_what_is_not_a_telemetry_is_refused_clearly(telemetry: Any, message: str) -> None:
    middleware = PersonalizeMiddleware(Starlette(), telemetry=telemetry)
    error = middleware.configuration_error  # raised by the start-up (see _options)
    assert isinstance(error, ConfigurationError) and error.field == "telemetry"
    assert re.search(message, str(error))


class Broken(Telemetry):
    """Raises in every hook: a telemetry bug must not cost a page."""

    def page_started(self, keys: tuple[str, ...]) -> None:
        raise RuntimeError("page_started broke")

    def upstream_call_started(self, endpoint: str) -> object:
        raise RuntimeError("upstream_call_started broke")

    def upstream_call_finished(self, *args: Any) -> None:
        raise RuntimeError("upstream_call_finished broke")

    def cache_result(self, source: str, count: int) -> None:
        raise RuntimeError("cache_result broke")

    def breaker_changed(self, state: str) -> None:
        raise RuntimeError("breaker_changed broke")


async def test_a_telemetry_that_raises_is_logged_and_the_page_still_renders(
    upstream: FaultyUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="personalize_middleware.telemetry")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    middleware = PersonalizeMiddleware(
        Starlette(routes=[Route("/", waits)]),
        settings=PersonalizeSettings(
            workspace_id=WORKSPACE, api_secret=SECRET, base_url=upstream.base_url
        ),
        routes={"/": list(KEYS)},
        identify=header_identity,
        secret_key=SIGNING_KEY,
        metadata_refresh=None,
        tracking=False,
        telemetry=[Broken(), OpenTelemetry(tracer_provider=provider)],
    )
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
        response = await client.get("/", headers={"x-user": "u8"})
    await middleware.shutdown()
    assert response.json() == {key: f"{key}:u8" for key in KEYS}
    # The other telemetry still saw everything.
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["POST /experiences/fetch", "personalize.page"]
    broken = {r.getMessage() for r in caplog.records}
    assert "personalize: telemetry Broken.page_started failed; ignored" in broken
    assert "personalize: telemetry Broken.upstream_call_finished failed; ignored" in broken


async def test_unsampled_pages_export_nothing_and_still_render(upstream: FaultyUpstream) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    site = Traced(upstream.base_url, {"/": list(KEYS)}, sampler=ALWAYS_OFF)
    try:
        assert await site.page("u9") == {key: f"{key}:u9" for key in KEYS}
        assert site.exporter.get_finished_spans() == ()
    finally:
        await site.aclose()
