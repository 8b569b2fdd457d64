"""Tracking wired through PersonalizeMiddleware + setup_templates: the page's tokens are
accepted from the visitor who got the page, and from nobody else."""

from __future__ import annotations

import html
import re
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.testclient import TestClient

from personalize_middleware import Identity, PersonalizeMiddleware, setup_templates
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN
from personalize_middleware._signing import Keyring
from personalize_middleware.tracking import Tracking
from tests.support.tracking_helpers import (
    GOOGLEBOT_USER_AGENT,
    FakeClock,
    StaticBackend,
    context_for,
)

SECRET = "middleware-tracking-secret-0123"

PAGE = """\
{% experience "hero" as hero %}<section{{ impression(hero) }}><h1>{{ hero.Title }}</h1>\
<button{{ track_click(hero, "Add to Cart") }}>Add</button></section>{% endexperience %}\
{{ personalize_script() }}"""


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


def clocked(backend: StaticBackend, clock: FakeClock, **options: Any) -> Tracking:
    """Tracking on a clock the test moves on (pass it as ``make_app(tracking=...)``)."""
    return Tracking(keyring=Keyring.from_config(SECRET), backend=backend, clock=clock, **options)


def make_app(backend: StaticBackend, **options: Any) -> Starlette:
    templates = Jinja2Templates(
        env=jinja2.Environment(
            loader=jinja2.DictLoader({"page.html": PAGE}), autoescape=jinja2.select_autoescape()
        )
    )
    setup_templates(templates)

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html")

    options.setdefault("routes", {"/": ["hero"]})
    return Starlette(
        routes=[Route("/", page)],
        middleware=[
            Middleware(
                PersonalizeMiddleware,
                backend=backend,
                identify=header_identity,
                secret_key=SECRET,
                metadata_refresh=None,
                **options,
            )
        ],
    )


def hooks(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for attr, value in re.findall(r' (data-pz-[a-z]+)="([^"]*)"', text):
        found.setdefault(attr, []).append(html.unescape(value))
    return found


def post(client: TestClient, tokens: list[str], found: dict[str, list[str]]) -> int:
    """Beacon ``tokens`` of the page whose hooks are ``found`` (its manifest goes along,
    as the script sends it, when a hook holds an index into it)."""
    body: dict[str, object] = {"events": tokens}
    if "data-pz-page" in found and any("~" in t for t in tokens):
        body["page"] = found["data-pz-page"][-1]
    response = client.post(
        "/_personalize/events",
        json=body,
        headers={"origin": "http://testserver", "sec-fetch-site": "same-origin"},
    )
    return response.status_code


def test_anonymous_visitor_page_to_events() -> None:
    backend, clock = StaticBackend({"hero": {"Title": "Hi"}}), FakeClock()
    with TestClient(make_app(backend, tracking=clocked(backend, clock))) as client:
        page = client.get("/")
        found = hooks(page.text)
        visitor_cookie = next(iter(client.cookies.values()))
        assert found["data-pz-endpoint"] == ["/_personalize/events"]
        tokens = found["data-pz-impression"] + found["data-pz-click"]
        clock.advance(1.5)  # the visitor saw the hero for a second, then clicked
        # Someone else (no cookie: a new anonymous visitor) cannot use this page's tokens.
        # (No `with`: a second lifespan would shut the shared middleware down.)
        assert post(TestClient(client.app), tokens, found) == 403
        assert post(client, tokens, found) == 204
        assert post(client, tokens, found) == 204  # replay: accepted, forwarded once
    # Leaving the TestClient ran the lifespan shutdown, which flushed the batcher.
    (element,) = backend.events
    assert element["customer_id"] and element["customer_id"] in visitor_cookie
    actions = [(a["action"], a["attributes"].get("b_id")) for a in element["actions"]]
    assert actions == [(ACTION_SHOWN, None), (ACTION_CLICKED, "Add to Cart")]
    assert element["actions"][0]["attributes"] == context_for("hero")


def test_logged_in_user_is_reported_by_customer_id() -> None:
    backend, clock = StaticBackend({"hero": {"Title": "Hi"}}), FakeClock()
    app = make_app(backend, tracking=clocked(backend, clock))
    with TestClient(app, headers={"x-user": "u-42"}) as client:
        found = hooks(client.get("/").text)
        clock.advance(1.5)
        assert "u-42" not in "".join(found["data-pz-impression"])
        assert post(client, found["data-pz-impression"], found) == 204
        client.headers["x-user"] = "u-43"  # logged in as someone else since
        assert post(client, found["data-pz-click"], found) == 403
    assert [e["customer_id"] for e in backend.events] == ["u-42"]


def test_script_is_served_through_the_middleware() -> None:
    backend = StaticBackend({"hero": {"Title": "Hi"}})
    with TestClient(make_app(backend)) as client:
        page = client.get("/")
        src = re.search(r'<script defer src="([^"]+)"', page.text)
        assert src is not None
        script = client.get(src.group(1))
        assert script.status_code == 200
        assert "immutable" in script.headers["cache-control"]
        assert client.get("/_personalize/nope").status_code == 404


def test_server_side_impressions_need_no_script() -> None:
    backend = StaticBackend({"hero": {"Title": "Hi"}})
    with TestClient(make_app(backend, impressions="server"), headers={"x-user": "u-7"}) as client:
        page = client.get("/")
        found = hooks(page.text)
        assert "data-pz-impression" not in found and "data-pz-click" in found
        client.get("/")  # another page view: another impression
    actions = [a for e in backend.events for a in e["actions"]]
    assert [a["action"] for a in actions] == [ACTION_SHOWN, ACTION_SHOWN]
    assert len({a["moe_event_uuid"] for a in actions}) == 2


def test_tracking_off_renders_no_hooks() -> None:
    backend = StaticBackend({"hero": {"Title": "Hi"}})
    with TestClient(make_app(backend, tracking=False)) as client:
        page = client.get("/")
    assert "<h1>Hi</h1>" in page.text and "data-pz" not in page.text and "<script" not in page.text


def test_tokens_posted_as_soon_as_the_page_arrives_are_not_counted() -> None:
    """The replay script: fetch the page, POST its tokens at once. Nothing is forwarded,
    and the same tokens sent again once a person could have seen the page are replays."""
    backend, clock = StaticBackend({"hero": {"Title": "Hi"}}), FakeClock()
    tracking = clocked(backend, clock)
    with TestClient(make_app(backend, tracking=tracking), headers={"x-user": "u-9"}) as client:
        found = hooks(client.get("/").text)
        tokens = found["data-pz-impression"] + found["data-pz-click"]
        clock.advance(0.05)
        assert post(client, tokens, found) == 204  # nothing for a script to tune against
        clock.advance(5)
        assert post(client, tokens, found) == 204
        stats = tracking.stats
        assert (stats.accepted, stats.rejected_too_soon, stats.replays) == (0, 2, 2)
    assert backend.events == []


def test_crawler_page_view_gets_no_tracking_attributes() -> None:
    backend = StaticBackend({"hero": {"Title": "Hi"}})
    tracking = clocked(backend, FakeClock())
    with TestClient(make_app(backend, tracking=tracking)) as client:
        page = client.get("/", headers={"user-agent": GOOGLEBOT_USER_AGENT})
        assert "<h1>Hi</h1>" in page.text  # the page itself is the same
        found = hooks(page.text)
        assert "data-pz-impression" not in found and "data-pz-click" not in found
        person = hooks(client.get("/").text)  # TestClient's own user agent is no crawler
        assert "data-pz-impression" in person and "data-pz-click" in person
        assert tracking.stats.bot_page_views == 1


def test_crawler_page_view_records_no_server_side_impression() -> None:
    backend = StaticBackend({"hero": {"Title": "Hi"}})
    tracking = clocked(backend, FakeClock(), impressions="server")
    with TestClient(make_app(backend, tracking=tracking), headers={"x-user": "u-7"}) as client:
        client.get("/", headers={"user-agent": GOOGLEBOT_USER_AGENT})
        client.get("/")
    actions = [a for e in backend.events for a in e["actions"]]
    assert [a["action"] for a in actions] == [ACTION_SHOWN]  # the person's page view only
