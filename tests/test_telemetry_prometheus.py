"""Prometheus metrics through the real middleware, the real client and a stand-in MoEngage
over real HTTP, read back by scraping a real registry (``generate_latest``).

The last test runs gunicorn with two uvicorn workers in multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``): one scrape sees what both workers counted.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.testclient import TestClient

from personalize_middleware import (
    CircuitBreaker,
    ConfigurationError,
    Identity,
    PersonalizeMiddleware,
    PersonalizeSettings,
    PrometheusMetrics,
    RedisSharedLayer,
    TrackingLimits,
    TrackingOptions,
    setup_templates,
)
from tests.conftest import require_tool
from tests.support.faulty_upstream import Fault, FaultyUpstream, wait_until
from tests.support.http_server import run_asgi_server
from tests.support.redis_support import REDIS_URL, delete_workspace, new_workspace, redis_available
from tests.support.tracking_helpers import API_SECRET, WORKSPACE_ID, EventsStandIn, beacon, error

pytestmark = pytest.mark.anyio

WORKSPACE = "WS_PROM"
SECRET = "prometheus-suite-api-secret-Qw3"
SIGNING_KEY = "prometheus-suite-signing-key-0123456789"
KEYS = ("hero", "promo")
BUDGET = 0.25
TTL = 30.0
SWR = 10.0
ROOT = Path(__file__).resolve().parents[1]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


async def waits(request: Request) -> Response:
    handle = request.state.personalize
    await handle.wait()
    return JSONResponse({key: handle.value(key, "title", "default") for key in handle.keys})


class Measured:
    """The page app behind PersonalizeMiddleware(telemetry=PrometheusMetrics(registry=...))."""

    def __init__(self, base_url: str, registry: CollectorRegistry, **options: Any) -> None:
        self.registry = registry
        self.breaker = options.pop("breaker", None) or CircuitBreaker(threshold=50)
        options.setdefault("metadata_refresh", None)
        options.setdefault("tracking", False)
        self.middleware = PersonalizeMiddleware(
            Starlette(routes=[Route("/", waits)]),
            settings=PersonalizeSettings(
                workspace_id=WORKSPACE,
                api_secret=SECRET,
                base_url=base_url,
                read_timeout=0.4,
                connect_timeout=0.5,
            ),
            routes={"/": list(KEYS)},
            identify=header_identity,
            secret_key=SIGNING_KEY,
            latency_budget=BUDGET,
            cache_ttl=TTL,
            stale_while_revalidate=SWR,
            stale_if_error=3600,
            breaker=self.breaker,
            telemetry=PrometheusMetrics(registry=registry),
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

    async def page(self, user: str) -> dict[str, str]:
        response = await self.client.get("/", headers={"x-user": user})
        assert response.status_code == 200, response.text
        titles: dict[str, str] = response.json()
        return titles

    def scrape(self) -> Samples:
        return scrape(self.registry)


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
async def site(upstream: FaultyUpstream) -> AsyncIterator[Measured]:
    measured = Measured(upstream.base_url, CollectorRegistry())
    yield measured
    await measured.aclose()


LATENCY = "personalize_upstream_request_duration_seconds"
CACHE = "personalize_cache_results_total"
PAGES = "personalize_page_keys_total"
DENIED = "personalize_fetch_denied_total"
BREAKER = "personalize_circuit_breaker_state"
TRANSITIONS = "personalize_circuit_breaker_transitions_total"
EVENTS = "personalize_events_total"
OUTBOX = "personalize_events_outbox_depth"


# -- upstream calls and the cache -----------------------------------------------------------


async def test_upstream_latency_is_a_histogram_by_endpoint_and_outcome(
    site: Measured, upstream: FaultyUpstream
) -> None:
    await site.page("u1")
    upstream.set_fault(Fault.ERROR_500, "fetch")
    await site.page("u2")
    upstream.set_fault(Fault.RATE_LIMITED, "fetch")
    await site.page("u3")
    samples = site.scrape()
    for outcome in ("ok", "unavailable", "rate_limited"):
        assert value(samples, LATENCY + "_count", endpoint="fetch", outcome=outcome) == 1
        assert (
            value(samples, LATENCY + "_bucket", endpoint="fetch", outcome=outcome, le="+Inf") == 1
        )
    took = value(samples, LATENCY + "_sum", endpoint="fetch", outcome="ok")
    assert 0 < took < 1.0
    # Buckets are cumulative and dense around the latency budget.
    assert value(samples, LATENCY + "_bucket", endpoint="fetch", outcome="ok", le="0.15") <= 1


async def test_cache_results_by_source_and_what_each_page_got(
    site: Measured, upstream: FaultyUpstream
) -> None:
    await site.page("u1")  # cold: two misses, one call, two fresh answers
    samples = site.scrape()
    assert value(samples, CACHE, source="miss") == 2
    assert value(samples, CACHE, source="hit") == 0
    assert value(samples, PAGES, reason="targeting_match") == 2

    await site.page("u1")
    samples = site.scrape()
    assert value(samples, CACHE, source="hit") == 2
    assert value(samples, PAGES, reason="cached") == 2

    site._age += TTL + 1  # stale-while-revalidate: served, one refresh
    await site.page("u1")
    await wait_until(lambda: not site.store._tasks, message="the refresh to land")
    assert upstream.calls("fetch") == 2
    samples = site.scrape()
    assert value(samples, CACHE, source="stale") == 2
    assert value(samples, PAGES, reason="stale") == 2

    site._age += TTL + SWR + 1  # only stale-if-error is left, and the upstream fails
    upstream.set_fault(Fault.ERROR_500, "fetch")
    assert await site.page("u1") == {key: f"{key}:u1" for key in KEYS}
    samples = site.scrape()
    assert value(samples, CACHE, source="miss") == 4
    assert value(samples, CACHE, source="fallback") == 2
    assert value(samples, PAGES, reason="stale") == 4
    assert value(samples, DENIED, reason="circuit_open") == 0  # a call was made: no denial


async def test_concurrent_pages_coalesce_and_a_hung_upstream_sheds(
    upstream: FaultyUpstream,
) -> None:
    site = Measured(upstream.base_url, CollectorRegistry(), max_concurrent_fetches=1)
    try:
        upstream.set_fault(Fault.HANG, "fetch")
        first = asyncio.create_task(site.page("u1"))
        await wait_until(lambda: upstream.hanging == 1, message="the first fetch hangs")
        same_user, other_user = await asyncio.gather(site.page("u1"), site.page("u2"))
        assert await first == same_user == dict.fromkeys(KEYS, "default")
        assert other_user == dict.fromkeys(KEYS, "default")
        samples = site.scrape()
        assert value(samples, CACHE, source="miss") == 6
        assert value(samples, CACHE, source="coalesced") == 2
        assert value(samples, CACHE, source="shed") == 2
        assert value(samples, PAGES, reason="error") == 6
        assert upstream.calls("fetch") == 1
    finally:
        upstream.release()
        await site.aclose()


# -- the breaker and the denials ------------------------------------------------------------


async def test_breaker_state_and_transitions_and_circuit_open_denials(
    upstream: FaultyUpstream,
) -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=0.3)
    site = Measured(upstream.base_url, CollectorRegistry(), breaker=breaker)
    try:
        samples = site.scrape()
        assert value(samples, BREAKER, state="closed") == 1
        assert value(samples, BREAKER, state="open") == 0
        assert value(samples, BREAKER, state="half-open") == 0

        upstream.set_fault(Fault.ERROR_503, "fetch")
        await site.page("u1")
        await site.page("u2")
        assert breaker.state == "open"
        await site.page("u3")  # no call: the circuit is open
        samples = site.scrape()
        assert value(samples, BREAKER, state="open") == 1
        assert value(samples, BREAKER, state="closed") == 0
        assert value(samples, TRANSITIONS, state="open") == 1
        assert value(samples, DENIED, reason="circuit_open") == 1
        assert upstream.calls("fetch") == 2

        upstream.set_fault(Fault.OK, "fetch")
        await wait_until(lambda: breaker.state == "half-open", message="the cooldown")
        assert await site.page("u4") == {key: f"{key}:u4" for key in KEYS}  # the probe
        samples = site.scrape()
        assert value(samples, TRANSITIONS, state="half-open") == 1
        assert value(samples, TRANSITIONS, state="closed") == 1
        assert value(samples, BREAKER, state="closed") == 1
        assert value(samples, BREAKER, state="open") == 0
        assert value(samples, BREAKER, state="half-open") == 0
    finally:
        await site.aclose()


@pytest.mark.redis
async def test_shared_hits_and_budget_denials_with_redis(upstream: FaultyUpstream) -> None:
    require_tool(redis_available(), f"a Redis server at {REDIS_URL}")
    workspace, budgeted = new_workspace(), new_workspace()
    registry = CollectorRegistry()  # two middlewares (two processes' worth) report into one
    first = Measured(
        upstream.base_url, registry, shared=RedisSharedLayer(REDIS_URL, workspace_id=workspace)
    )
    second = Measured(
        upstream.base_url, registry, shared=RedisSharedLayer(REDIS_URL, workspace_id=workspace)
    )
    tight = Measured(
        upstream.base_url,
        CollectorRegistry(),
        shared=RedisSharedLayer(REDIS_URL, workspace_id=budgeted, rate_limit_per_minute=1),
    )
    try:
        await first.page("u1")
        await second.page("u1")  # its own L1 misses; Redis has the fresh answer
        samples = first.scrape()
        assert value(samples, CACHE, source="miss") == 4
        assert value(samples, CACHE, source="shared") == 2
        assert upstream.calls("fetch") == 1

        assert await tight.page("u2") == {key: f"{key}:u2" for key in KEYS}
        assert await tight.page("u3") == dict.fromkeys(KEYS, "default")  # budget spent
        samples = tight.scrape()
        assert value(samples, DENIED, reason="budget") == 1
        assert value(samples, PAGES, reason="error") == 2
        assert upstream.calls("fetch") == 2
    finally:
        for site in (first, second, tight):
            await site.aclose()
        delete_workspace(workspace)
        delete_workspace(budgeted)


# -- events ---------------------------------------------------------------------------------

PAGE = """\
{% experience "hero" as hero %}<section{{ impression(hero) }}>{{ hero.title }}\
<button{{ track_click(hero, "Add to Cart") }}>Add</button></section>{% endexperience %}\
{{ personalize_script() }}"""


def tracked_site(base_url: str, registry: CollectorRegistry) -> Starlette:
    templates = Jinja2Templates(
        env=jinja2.Environment(
            loader=jinja2.DictLoader({"page.html": PAGE}), autoescape=jinja2.select_autoescape()
        )
    )
    setup_templates(templates)

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html")

    app = Starlette(routes=[Route("/", page)])
    app.add_middleware(
        PersonalizeMiddleware,
        settings=PersonalizeSettings(
            workspace_id=WORKSPACE_ID, api_secret=API_SECRET, base_url=base_url
        ),
        routes={"/": ["hero"]},
        identify=header_identity,
        secret_key=SIGNING_KEY,
        metadata_refresh=None,
        telemetry=PrometheusMetrics(registry=registry),
        # The tests' beacons follow their page at once: the human timing is not under test.
        tracking=TrackingOptions(limits=TrackingLimits.off()),
    )
    return app


def send_page_events(client: TestClient) -> None:
    text = client.get("/").text
    found = [html.unescape(v) for v in re.findall(r' data-pz-(?:impression|click)="([^"]*)"', text)]
    assert len(found) == 2
    response = client.post(
        "/_personalize/events",
        json=beacon(text, found),
        headers={"origin": "http://testserver", "sec-fetch-site": "same-origin"},
    )
    assert response.status_code == 204


def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` from the test's thread while the app's loop runs in the
    TestClient's; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_events_accepted_retried_sent_and_the_outbox_depth() -> None:
    standin = EventsStandIn(
        {"hero": {"title": "Hi"}},
        plan=lambda number, body: error(503) if number == 0 else None,  # one retry
    )
    registry = CollectorRegistry()
    with (
        run_asgi_server(standin.app()) as root,
        TestClient(tracked_site(root + "/v1", registry), headers={"x-user": "u-1"}) as client,
    ):
        assert value(scrape(registry), OUTBOX) == 0
        send_page_events(client)
        samples = scrape(registry)
        assert value(samples, EVENTS, outcome="accepted") == 2
        assert value(samples, EVENTS, outcome="queued") == 2
        assert value(samples, OUTBOX) == 2  # flushed after the batcher's interval
        eventually(lambda: value(scrape(registry), EVENTS, outcome="sent") == 2, "delivery")
        samples = scrape(registry)
        assert value(samples, EVENTS, outcome="retried") == 2
        assert value(samples, OUTBOX) == 0
        latency = LATENCY + "_count"
        assert value(samples, latency, endpoint="events", outcome="unavailable") == 1
        assert value(samples, latency, endpoint="events", outcome="ok") == 1
    assert len(standin.delivered) == 2


def test_refused_events_are_counted_as_dropped_by_reason() -> None:
    standin = EventsStandIn({"hero": {"title": "Hi"}}, plan=lambda number, body: error(400))
    registry = CollectorRegistry()
    with (
        run_asgi_server(standin.app()) as root,
        TestClient(tracked_site(root + "/v1", registry), headers={"x-user": "u-2"}) as client,
    ):
        send_page_events(client)
        eventually(
            lambda: value(scrape(registry), EVENTS, outcome="dropped_rejected") == 2, "drops"
        )
        samples = scrape(registry)
        assert value(samples, EVENTS, outcome="sent") == 0
        assert value(samples, OUTBOX) == 0
    assert standin.delivered == []


# -- the class itself -----------------------------------------------------------------------


def test_instances_on_one_registry_share_its_metrics() -> None:
    registry = CollectorRegistry()
    one, two = PrometheusMetrics(registry=registry), PrometheusMetrics(registry=registry)
    one.cache_result("hit", 2)
    two.cache_result("hit", 3)
    assert value(scrape(registry), CACHE, source="hit") == 5
    assert one.scrape_registry() is registry and not one.multiprocess
    other = PrometheusMetrics(registry=registry, namespace="shop")
    other.cache_result("miss", 1)
    assert value(scrape(registry), "shop_cache_results_total", source="miss") == 1


def test_without_prometheus_client_installed_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "prometheus_client"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigurationError, match=r"personalize-middleware\[prometheus\]"):
        PrometheusMetrics()


# -- gunicorn, two workers, multiprocess mode -----------------------------------------------

GUNICORN_CONFIG = """\
from prometheus_client import multiprocess


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""


@pytest.mark.slow
def test_gunicorn_workers_in_multiprocess_mode_are_scraped_together(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (tmp_path / "gunicorn.conf.py").write_text(GUNICORN_CONFIG)
    upstream = FaultyUpstream(
        workspace_id=WORKSPACE, api_secret=SECRET, known_keys=KEYS, ok_delay=(0.02, 0.05)
    )
    port = _free_port()
    with upstream.serve():
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "PROM_TEST_UPSTREAM": upstream.base_url,
            "PROM_TEST_WORKSPACE": WORKSPACE,
            "PROM_TEST_SECRET": SECRET,
            "PYTHONPATH": str(ROOT),
        }
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "tests.support.prometheus_app:app",
                "-c",
                str(tmp_path / "gunicorn.conf.py"),
                "-k",
                "uvicorn.workers.UvicornWorker",
                "-w",
                "2",
                "-b",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "5",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            pages_by_pid = _load_both_workers(f"http://127.0.0.1:{port}", server)
            pages = sum(pages_by_pid.values())
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                text = client.get("/metrics").text
        finally:
            server.send_signal(signal.SIGTERM)
            _, stderr = server.communicate(timeout=30)
    assert len(pages_by_pid) == 2, pages_by_pid  # both workers served pages
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    # One scrape (answered by one worker) counts what both workers did.
    assert value(samples, LATENCY + "_count", endpoint="fetch", outcome="ok") == pages
    assert value(samples, CACHE, source="miss") == 2 * pages
    assert value(samples, PAGES, reason="targeting_match") == 2 * pages
    assert upstream.calls("fetch") == pages
    # Gauges sum over live processes: two workers, both closed, nothing pending.
    assert value(samples, BREAKER, state="closed") == 2
    assert value(samples, BREAKER, state="open") == 0
    assert value(samples, OUTBOX) == 0
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")[-2000:]
    # mark_process_dead ran for the exited workers: their live gauges are gone.
    assert not list(metrics_dir.glob("gauge_livesum_*.db"))


def _load_both_workers(base_url: str, server: subprocess.Popen[bytes]) -> dict[int, int]:
    """Pages (each a new user: one miss per key, one fetch) until both workers served some;
    concurrent, on fresh connections, so the kernel spreads them over the workers."""
    deadline = time.monotonic() + 30
    while True:  # until the workers answer
        if server.poll() is not None:
            raise AssertionError(f"gunicorn exited with {server.returncode}")
        try:
            if httpx.get(base_url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("gunicorn did not start")
        time.sleep(0.05)

    pages: dict[int, int] = {}

    async def one(number: int) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
            response = await client.get("/", headers={"x-user": f"user-{number}"})
        assert response.status_code == 200
        body = response.json()
        assert body["titles"] == {key: f"{key}:user-{number}" for key in KEYS}
        pages[body["pid"]] = pages.get(body["pid"], 0) + 1

    async def load() -> None:
        number = 0
        while len(pages) < 2 or sum(pages.values()) < 20:
            if number >= 400:
                raise AssertionError(f"one worker served everything: {pages}")
            await asyncio.gather(*(one(number + i) for i in range(8)))
            number += 8

    asyncio.run(load())
    return pages


def _free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound, then released for gunicorn to take)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
