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
import json
import logging
import re
import threading
import traceback
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2 import DictLoader, Environment
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from personalize_middleware import (
    APIError,
    BadRequestError,
    Identity,
    PersonalizeClient,
    PersonalizeMiddleware,
    PersonalizeSettings,
    RetryPolicy,
    setup_templates,
)
from personalize_middleware._redact import Redactor, secret_forms
from personalize_middleware.tracking import TrackingLimits
from personalize_middleware.upstream._breaker import CircuitBreaker
from tests.support.faulty_upstream import Fault, FaultyUpstream, wait_until
from tests.support.http_server import run_asgi_server
from tests.support.tracking_helpers import beacon as beacon_body
from tests.support.tracking_helpers import hook_values

pytestmark = pytest.mark.anyio

WORKSPACE = "WS_LEAKS"
SECRET = "Zq9-s3cr3t-never-shown-7f3a"
TOKEN = base64.b64encode(f"{WORKSPACE}:{SECRET}".encode()).decode()
FORBIDDEN = (SECRET, TOKEN, f"Basic {TOKEN}")
KEYS = ("hero", "promo", "sidebar")
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
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
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://shop.test",
        headers={"user-agent": BROWSER},  # httpx's own is on the crawler list: no tracking
    )
    return app, client


async def visit(client: httpx.AsyncClient, user: str | None, pages: list[str]) -> None:
    """A page view and, when the page has tracking hooks, the browser's beacon."""
    headers = {"x-user": user} if user else {}
    response = await client.get("/", headers=headers)
    assert response.status_code == 200
    pages.append(response.text + "\n" + "\n".join(response.headers.get_list("set-cookie")))
    tokens = hook_values(response.text)
    if tokens:
        beacon = await client.post(
            "/_personalize/events", json=beacon_body(response.text), headers=headers
        )
        assert beacon.status_code == 204


async def test_the_secret_never_appears_in_logs_pages_reprs_or_errors(
    upstream: FaultyUpstream, captured: Everything
) -> None:
    app, client = site(upstream)
    pages: list[str] = []
    assert app.tracking is not None
    batcher = app.tracking.batcher
    # Beacons go out right after each page: faster than a person, which is not the point.
    app.tracking.limits = TrackingLimits.off()
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


# -- every form of the secret, echoed everywhere ---------------------------------------------
#
# Regression: a 401 echoing the credentials URL-encoded, base64-encoded (the Basic token)
# or cut short put the API secret in AuthenticationError's text, its repr and its
# traceback (only the raw secret and the exact token were replaced), and echoes in headers
# or in the status line reached httpcore's and httpx's log records unchanged.

FORMS_WORKSPACE = "WS_FORMS"
# Characters that URL-encoding and base64 change: each form differs from the raw secret.
FORMS_SECRET = "Zq9/s3cr3t+never shown=7f3a%x"
FORMS_TOKEN = base64.b64encode(f"{FORMS_WORKSPACE}:{FORMS_SECRET}".encode()).decode()
REDACTED = "********"


def forms_of(authorization: str) -> dict[str, str]:
    """What a careless proxy might repeat of the Authorization header it received."""
    token = authorization.partition(" ")[2]
    credentials = base64.b64decode(token).decode()
    secret = credentials.partition(":")[2]
    quoted = quote(secret, safe="")
    return {
        "authorization": authorization,
        "token": token,
        "token-urlencoded": quote(token, safe=""),
        "token-urlsafe": base64.urlsafe_b64encode(credentials.encode()).decode(),
        "token-truncated": token[:-7],
        "credentials": credentials,
        "credentials-quote": quote(credentials),
        "credentials-quote-plus": quote_plus(credentials),
        "secret": secret,
        "secret-quote": quoted,
        "secret-quote-lowercase-hex": re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), quoted),
        "secret-quote-plus": quote_plus(secret),
        "secret-quoted-twice": quote(quoted, safe=""),
        "secret-base64": base64.b64encode(secret.encode()).decode(),
        "secret-base64-urlsafe": base64.urlsafe_b64encode(secret.encode()).decode(),
        "secret-prefix": secret[:9] + "...",
        "secret-window": secret[6:14],
        "secret-glued": "x-" + secret + "-tail",
        "secret-between-zero-widths": "\u200b".join(secret),
        "secret-between-nuls": "\x00".join(secret),
    }


def windows(text: str, width: int = 8) -> set[str]:
    return {text[i : i + width] for i in range(len(text) - width + 1)}


ECHOES = forms_of(f"Basic {FORMS_TOKEN}")
# Everything that must never be seen: each echoed form whole (the joined ones are caught
# by the secret's windows once the joiners are dropped), and every run of 8 characters
# of the secret and of its URL-encoded and base64 forms.
MUST_NOT_APPEAR = {form for form in ECHOES.values() if len(form) >= 8}
for _form in (
    FORMS_SECRET,
    FORMS_TOKEN,
    quote(FORMS_SECRET, safe=""),
    quote_plus(FORMS_SECRET),
    base64.b64encode(FORMS_SECRET.encode()).decode(),
):
    MUST_NOT_APPEAR |= windows(_form)


def leaked(texts: list[str]) -> list[str]:
    joined = "\n".join(texts)
    return sorted(form for form in MUST_NOT_APPEAR if form in joined)


def header_safe(form: str) -> bool:
    return form.isascii() and form.isprintable()


class EchoingUpstream:
    """A stand-in that answers every call with ``(form, place)``: the form of the
    credentials it received, put in one place of its answer."""

    PLACES = ("json-401", "json-400", "json-429", "json-503", "headers", "content-type")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._echo = ("secret", "json-401")
        self.calls = 0

    def echo(self, form: str, place: str) -> None:
        with self._lock:
            self._echo = (form, place)

    async def answer(self, request: Request) -> Response:
        with self._lock:
            name, place = self._echo
            self.calls += 1
        form = forms_of(request.headers["authorization"])[name]
        if place.startswith("json-"):
            body = {"title": f"Denied {form}", "description": f"you sent {form}", "code": form}
            return Response(json.dumps(body), int(place[5:]), media_type="application/json")
        if place == "headers":
            headers = {"WWW-Authenticate": f'Basic realm="{form}"', "X-Echo": form}
            return Response(b'{"title": "Denied"}', 401, headers, "application/json")
        assert place == "content-type"
        return Response(b"<html>no</html>", 200, {"Content-Type": f'text/html; echo="{form}"'})

    def app(self) -> Starlette:
        paths = ("/v1/experiences/fetch", "/v1/experiences/metadata", "/v1/experiences/events")
        return Starlette(routes=[Route(p, self.answer, methods=["GET", "POST"]) for p in paths])


@pytest.fixture(scope="module")
def echoing() -> Iterator[tuple[EchoingUpstream, str]]:
    stand_in = EchoingUpstream()
    with run_asgi_server(stand_in.app()) as root:
        yield stand_in, root + "/v1"


def forms_settings(base_url: str) -> PersonalizeSettings:
    return PersonalizeSettings(
        workspace_id=FORMS_WORKSPACE, api_secret=FORMS_SECRET, base_url=base_url
    )


def what_an_app_sees(error: BaseException) -> list[str]:
    """Every way an application shows a caught error: str, repr, attributes, traceback,
    and a log line with the traceback (captured by the ``captured`` handler)."""
    logging.getLogger("app").exception("the app logs what it caught", exc_info=error)
    return [
        str(error),
        repr(error),
        repr(vars(error)),
        repr(error.args),
        "".join(traceback.format_exception(error)),
    ]


@pytest.mark.parametrize("form", list(ECHOES))
async def test_no_form_of_the_secret_survives_an_echo_anywhere_in_the_answer(
    form: str, echoing: tuple[EchoingUpstream, str], captured: Everything
) -> None:
    stand_in, base_url = echoing
    places = [p for p in stand_in.PLACES if p.startswith("json") or header_safe(ECHOES[form])]
    async with PersonalizeClient(forms_settings(base_url)) as client:
        for place in places:
            stand_in.echo(form, place)
            seen_before = len(captured.texts)
            with pytest.raises(APIError) as caught:
                await client.fetch_experiences(["hero"], customer_id="u")
            texts = what_an_app_sees(caught.value) + captured.texts[seen_before:]
            assert leaked(texts) == [], place
            # The echo really arrived and was scrubbed (so the check above could fail).
            assert any(REDACTED in text for text in texts), (place, texts)
            if place.startswith("json"):
                assert REDACTED in str(caught.value)
    assert {"httpcore.http11", "httpx", "app"} <= captured.names


async def test_bad_request_fields_are_bounded_printable_and_redacted(
    echoing: tuple[EchoingUpstream, str],
) -> None:
    stand_in, base_url = echoing
    stand_in.echo("secret-between-nuls", "json-400")
    async with PersonalizeClient(forms_settings(base_url)) as client:
        with pytest.raises(BadRequestError) as caught:
            await client.fetch_experiences(["hero"], customer_id="u")
    error = caught.value
    for field in (error.title, error.description, error.code):
        assert field is not None
        assert REDACTED in field
        assert field.isprintable()
        assert len(field) <= 200
    assert leaked([error.title or "", error.description or "", error.code or ""]) == []


# A status line, header lines and reason phrases are written by the far end too, and
# httpx / h11 quote a malformed one in their exception (chained into ours with `from`).
RAW_ANSWERS = {
    "reason-phrase": "HTTP/1.1 401 Unauthorized {form}\r\n"
    "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
    "illegal-header-line": "HTTP/1.1 401 Unauthorized\r\nX-Echo {form}\r\n\r\n",
    "illegal-status-line": "HTTP/1.1 4{form}\r\n\r\n",
}


async def serve_raw(form: str, where: str) -> tuple[asyncio.Server, str]:
    """A bare HTTP/1.1 server on 127.0.0.1 whose answer echoes ``form`` of the request's
    own Authorization header at ``where``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        pairs = (line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        fields = {name.lower(): value for name, value in pairs}
        await reader.readexactly(int(fields.get("content-length", "0")))
        echoed = forms_of(fields["authorization"])[form]
        writer.write(RAW_ANSWERS[where].format(form=echoed).encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize("where", list(RAW_ANSWERS))
@pytest.mark.parametrize(
    "form", [name for name, form in ECHOES.items() if header_safe(form) and " " not in form]
)
async def test_no_form_of_the_secret_survives_an_echo_in_the_status_or_header_lines(
    form: str, where: str, captured: Everything
) -> None:
    server, base_url = await serve_raw(form, where)
    try:
        async with PersonalizeClient(forms_settings(base_url)) as client:
            with pytest.raises(APIError) as caught:
                await client.fetch_metadata()
    finally:
        server.close()
        await server.wait_closed()
    texts = what_an_app_sees(caught.value) + captured.texts
    assert leaked(texts) == []
    assert any(REDACTED in text for text in texts)
    if where != "reason-phrase":
        # h11's message named the bad line; it is still chained, scrubbed.
        assert caught.value.__cause__ is not None
        assert REDACTED in str(caught.value.__cause__)


# -- the redactor itself -----------------------------------------------------------------------


# No "*" in the secret: the marker itself would then look like a piece of it.
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    secret=st.text(
        st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="*"),
        min_size=8,
    ),
    workspace=st.from_regex(r"[A-Za-z0-9_\-]{1,20}", fullmatch=True),
    before=st.text(max_size=20),
    after=st.text(max_size=20),
    data=st.data(),
)
def test_any_run_of_8_characters_of_any_form_is_redacted(
    secret: str, workspace: str, before: str, after: str, data: st.DataObject
) -> None:
    redactor = Redactor.for_credentials(workspace, secret)
    form = data.draw(st.sampled_from(secret_forms(secret, workspace)))
    start = data.draw(st.integers(0, max(0, len(form) - 8)))
    end = data.draw(st.integers(min(len(form), start + 8), len(form)))
    piece = form[start:end]
    redacted = redactor.redact(before + piece + after)
    assert piece not in redacted or len(piece) < 8
    assert not any(window in redacted for window in windows(piece))
    assert not redactor.leaks(redacted)


def test_secret_forms_cover_the_basic_token_and_the_secret_alone() -> None:
    forms = secret_forms(FORMS_SECRET, FORMS_WORKSPACE)
    redactor = Redactor(forms)
    for echoed in ECHOES.values():
        assert REDACTED in redactor.snippet(f"you sent: {echoed}.")
    assert redactor.redact("nothing secret here") == "nothing secret here"
    assert FORMS_SECRET not in repr(redactor) and FORMS_TOKEN not in repr(redactor)


def test_snippet_is_short_single_line_and_printable() -> None:
    redactor = Redactor.for_credentials(FORMS_WORKSPACE, FORMS_SECRET)
    text = "line one\r\nline\ttwo \x1b[31mred\x1b[0m \u202egnirts\u200b" + "x" * 1000
    shown = redactor.snippet(text)
    assert shown.startswith("line one line two [31mred[0m gnirts")
    assert shown.isprintable() and len(shown) == 200 and shown.endswith("...")
