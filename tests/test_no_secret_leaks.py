"""The API secret never leaks: not in a log record (every logger at DEBUG, formatted with
its traceback), not in a rendered page, cookie or tracking token, not in a repr or an
exception, whatever MoEngage answers, even when its error pages echo the credentials
back (as a careless proxy might).

The whole flow runs for real: pages rendered from Jinja templates with tracking hooks,
beacons, the event batcher, the metadata refresher, the real client over HTTP against the
stand-in, with healthy answers, 400, 401, 500, HTML pages, hangs and connection resets.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import threading
import traceback
from collections.abc import Iterator

import httpx
import pytest
from jinja2 import DictLoader, Environment
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from personalize_middleware import (
    APIError,
    Identity,
    PersonalizeClient,
    PersonalizeMiddleware,
    PersonalizeSettings,
    RetryPolicy,
    setup_templates,
)
from personalize_middleware.upstream._breaker import CircuitBreaker
from tests.support.faulty_upstream import Fault, FaultyUpstream, wait_until

pytestmark = pytest.mark.anyio

WORKSPACE = "WS_LEAKS"
SECRET = "Zq9-s3cr3t-never-shown-7f3a"
TOKEN = base64.b64encode(f"{WORKSPACE}:{SECRET}".encode()).decode()
FORBIDDEN = (SECRET, TOKEN, f"Basic {TOKEN}")
KEYS = ("hero", "promo", "sidebar")
LOGGERS: tuple[str, ...] = ("", "httpx", "httpcore", "uvicorn", "uvicorn.error", "asyncio")
LOGGERS += ("uvicorn.access", "personalize_middleware")

PAGE = """<!doctype html><html><body>
{% experience "hero" as hero %}
  <section{{ impression(hero) }}><h1>{{ hero.get("title", "Welcome") }}</h1>
  <p>{{ hero.string("medium") }}</p>
  <button{{ track_click(hero, "Add to Cart") }}>Add to Cart</button></section>
{% else %}<h1>Welcome</h1>{% endexperience %}
{% experience "promo" as promo %}<aside{{ impression(promo) }}>{{ promo.json("config") }}
  </aside>{% endexperience %}
<p>{{ personalize_value("sidebar", "count", 0) }}</p>
{{ personalize_script() }}
</body></html>"""


class Everything(logging.Handler):
    """Every record of every logger, formatted as a log file would show it (traceback
    included), plus its raw attributes (args, extras) in case a formatter shows them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(
            logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s %(threadName)s")
        )
        self.texts: list[str] = []
        self.names: set[str] = set()
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record) + "\n" + repr(record.__dict__)
        with self._guard:
            self.texts.append(text)
            self.names.add(record.name)


@pytest.fixture
def captured() -> Iterator[Everything]:
    handler = Everything()
    saved = []
    for name in LOGGERS:
        log = logging.getLogger(name)
        saved.append((log, log.level, log.disabled))
        log.setLevel(logging.DEBUG)
        log.disabled = False
        log.addHandler(handler)
    try:
        yield handler
    finally:
        for log, level, disabled in saved:
            log.removeHandler(handler)
            log.setLevel(level)
            log.disabled = disabled


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    stand_in = FaultyUpstream(
        workspace_id=WORKSPACE, api_secret=SECRET, known_keys=KEYS, echo_credentials=True
    )
    with stand_in.serve():
        yield stand_in


def leaks(text: str) -> list[str]:
    return [secret for secret in FORBIDDEN if secret in text]


def identify(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


def site(upstream: FaultyUpstream) -> tuple[PersonalizeMiddleware, httpx.AsyncClient]:
    templates = Jinja2Templates(env=Environment(loader=DictLoader({"page.html": PAGE})))
    setup_templates(templates)

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html")

    app = PersonalizeMiddleware(
        Starlette(routes=[Route("/", page)]),
        settings=PersonalizeSettings(
            workspace_id=WORKSPACE,
            api_secret=SECRET,
            base_url=upstream.base_url,
            read_timeout=0.3,
            connect_timeout=0.5,
        ),
        routes={"/": list(KEYS)},
        identify=identify,
        # No secret_key: signing keys are derived from the API secret, the riskiest setup.
        breaker=CircuitBreaker(threshold=1000, auth_pause=0.01),
        latency_budget=1.0,
        metadata_refresh=0.05,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://shop.test")
    return app, client


async def visit(client: httpx.AsyncClient, user: str | None, pages: list[str]) -> None:
    """A page view and, when the page has tracking hooks, the browser's beacon."""
    headers = {"x-user": user} if user else {}
    response = await client.get("/", headers=headers)
    assert response.status_code == 200
    pages.append(response.text + "\n" + "\n".join(response.headers.get_list("set-cookie")))
    tokens = re.findall(r'data-pz-(?:impression|click)="([^"]+)"', response.text)
    if tokens:
        beacon = await client.post("/_personalize/events", json={"events": tokens}, headers=headers)
        assert beacon.status_code == 204


async def test_the_secret_never_appears_in_logs_pages_reprs_or_errors(
    upstream: FaultyUpstream, captured: Everything
) -> None:
    app, client = site(upstream)
    pages: list[str] = []
    assert app.tracking is not None
    batcher = app.tracking.batcher
    # Retry quickly: each fault below must reach the events endpoint within the test.
    batcher.flush_interval = 0.05
    batcher.policy = RetryPolicy(auth_pause=0.05, backoff_initial=0.05, backoff_max=0.1)
    async with client:
        # Healthy: personalized pages, hooks, beacons, events delivered.
        for i in range(3):
            await visit(client, f"happy-{i}", pages)
        await visit(client, None, pages)  # anonymous, with the visitor cookie
        await batcher.flush()
        assert upstream.accepted_uuids  # events really went out
        assert any("hero:happy-0" in p for p in pages)
        # Every kind of failure on every endpoint, each echoing the credentials back.
        for n, fault in enumerate(
            [
                Fault.UNAUTHORIZED,
                Fault.BAD_REQUEST,
                Fault.ERROR_500,
                Fault.HTML_ERROR,
                Fault.RATE_LIMITED,
                Fault.MALFORMED_JSON,
                Fault.HANG,
                Fault.RESET,
            ]
        ):
            upstream.set_fault(fault)
            app.store.breaker.paused_until = 0.0  # a 401 / 429 pause must not hide the next
            await visit(client, f"sad-{n}", pages)  # a miss: the fetch meets the fault
            await visit(client, "happy-0", pages)  # cached: its beacon meets the fault
            await wait_until(
                lambda fault=fault: (
                    upstream.calls("events", fault) >= 1  # type: ignore[misc]
                    and upstream.calls("metadata", fault) >= 1
                ),
                message=f"events and metadata calls during {fault}",
            )
        upstream.set_fault(Fault.OK)
        app.store.breaker.paused_until = 0.0
        await visit(client, "recovered", pages)
        await asyncio.wait_for(batcher.flush(), 10)
    await app.shutdown()

    # The client's own errors, as an app catching them would see and log them.
    errors: list[str] = []
    settings = PersonalizeSettings(
        workspace_id=WORKSPACE, api_secret=SECRET, base_url=upstream.base_url, read_timeout=0.3
    )
    async with PersonalizeClient(settings) as backend:
        for fault in (Fault.UNAUTHORIZED, Fault.BAD_REQUEST, Fault.ERROR_503, Fault.HANG):
            upstream.set_fault(fault)
            with pytest.raises(APIError) as caught:
                await backend.fetch_experiences(["hero"], customer_id="u")
            error = caught.value
            errors += [str(error), repr(error), repr(vars(error)), repr(error.args)]
            errors.append("".join(traceback.format_exception(error)))
            logging.getLogger("app").exception("the app logs what it caught", exc_info=error)
        errors += [repr(backend), str(backend)]
    upstream.set_fault(Fault.OK)

    reprs = [
        repr(settings),
        str(settings),
        repr(app),
        repr(app.backend),
        repr(app.keyring),
        repr(app.tracking),
        repr(batcher),
        repr(app.store.stats),
    ]
    # The echo really happened (the test can fail): the stand-in put it in its answers.
    assert upstream.calls("fetch", Fault.UNAUTHORIZED) >= 1
    assert {"httpx", "httpcore.http11", "personalize_middleware.store"} <= captured.names
    assert any("401" in text for text in captured.texts)
    assert leaks("\n".join(captured.texts)) == []
    assert leaks("\n".join(pages)) == []
    assert leaks("\n".join(errors)) == []
    assert leaks("\n".join(reprs)) == []
    # The echoed credentials did reach log lines and errors (so the checks above could
    # fail), scrubbed.
    scrubbed = f"credentials {WORKSPACE}:********"
    assert any(scrubbed in text for text in captured.texts)
    assert any(scrubbed in text for text in errors)
