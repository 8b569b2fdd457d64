"""The debug overlay and Server-Timing, in process: who gets them (local mode, a QA
cookie, the options; never an ordinary visitor), what the data island holds and how it is
escaped, the assets and their integrity hashes, the QA link, the header's content. The
overlay in a real browser under a strict CSP is in test_devtools_browser.py."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from personalize_middleware import (
    Identity,
    PersonalizeMiddleware,
    PersonalizeTemplates,
    qa_link,
)
from personalize_middleware._grants import QA_COOKIE
from tests.support.fake_backend import FakeBackend

SECRET = "overlay-test-secret-0123456789"
XSS = "</script><script>alert(1)</script>"

PAGE = """\
<!doctype html><body>
{% experience "hero" as hero %}<section{{ impression(hero) }}>{{ hero.title }}</section>
{% endexperience %}
{% experience "other" as other %}{{ other.title }}{% endexperience %}
{{ personalize_script() }}
</body>"""


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


def make_middleware(**options: Any) -> PersonalizeMiddleware:
    templates = PersonalizeTemplates(
        env=jinja2.Environment(
            loader=jinja2.DictLoader({"page.html": PAGE}), autoescape=jinja2.select_autoescape()
        )
    )

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html")

    async def plain(request: Request) -> Response:
        return PlainTextResponse("not personalized")

    options.setdefault("routes", {"/": ["hero", "other"]})
    if "local_experiences" not in options:
        options.setdefault("backend", FakeBackend(known_keys={"hero"}))
    return PersonalizeMiddleware(
        Starlette(routes=[Route("/", page), Route("/plain", plain)]),
        identify=header_identity,
        secret_key=SECRET,
        metadata_refresh=None,
        latency_budget=30.0,
        **options,
    )


def island(page: str) -> dict[str, Any] | None:
    found = re.search(r'<script type="application/json" id="pz-overlay-data">(.*?)</script>', page)
    return None if found is None else dict(json.loads(found.group(1)))


def local_file(tmp_path: Path, audience: str = "All Users") -> Path:
    path = tmp_path / "experiences.json"
    variation = {"id": "7", "payload": {"title": {"value": "Hello", "data_type": "string"}}}
    experience = {
        "key": "hero",
        "name": "Hero <b>banner</b>",
        "status": "Active",
        "audiences": [{"name": audience, "id": "A1", "variations": [variation]}],
    }
    path.write_text(json.dumps({"experiences": [experience]}))
    return path


def test_local_mode_shows_the_overlay_to_everyone(tmp_path: Path) -> None:
    middleware = make_middleware(local_experiences=local_file(tmp_path))
    with TestClient(middleware) as client:
        first = client.get("/").text
        second = client.get("/").text
    data = island(first)
    assert data is not None
    rows = {row["key"]: row for row in data["experiences"]}
    assert rows["hero"]["source"] == "local" and rows["hero"]["variation"] == "7"
    assert rows["hero"]["audience"] == "All Users"
    assert rows["hero"]["name"] == "Hero <b>banner</b>"
    assert rows["hero"]["track"]  # the tokens' experience part: the overlay counts events
    assert rows["other"]["source"] == "default" and rows["other"]["reason"] == "no_match"
    assert island(second)["experiences"][0]["source"] == "cache"  # type: ignore[index]
    assert middleware.devtools is not None
    assert f'src="{middleware.devtools.script_path}"' in first
    assert f'integrity="{middleware.devtools.script_hash}"' in first
    assert 'rel="stylesheet"' in first


def test_ordinary_visitors_get_no_overlay_outside_local_mode(tmp_path: Path) -> None:
    with TestClient(make_middleware()) as client:
        page = client.get("/")
    assert island(page.text) is None and "pz-overlay" not in page.text
    assert "server-timing" not in page.headers
    with TestClient(
        make_middleware(local_experiences=local_file(tmp_path), debug_overlay=False)
    ) as client:
        assert island(client.get("/").text) is None


def test_every_tool_off_means_no_cookie_check_at_all() -> None:
    middleware = make_middleware(qa_cookies=False)
    assert middleware.devtools is None
    with TestClient(middleware) as client:
        client.cookies.set(QA_COOKIE, "anything")
        assert island(client.get("/").text) is None


def test_a_qa_link_gives_that_browser_the_overlay_and_server_timing() -> None:
    middleware = make_middleware()
    with TestClient(middleware) as client:
        link = qa_link("http://testserver/?x=1", secret_key=SECRET, label="anna")
        parts = urlsplit(link)
        answer = client.get(parts.path + "?" + parts.query, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/?x=1"
        assert answer.headers["set-cookie"].startswith(QA_COOKIE + "=qa1.")
        page = client.get("/", headers={"x-user": "qa"})
        data = island(page.text)
        assert data is not None and data["qa"] == "anna"
        assert re.fullmatch(
            r'personalize;dur=[0-9.]+;desc="network\+default:no_match"',
            page.headers["server-timing"],
        )
        assert page.headers["server-timing"]
        again = client.get("/", headers={"x-user": "qa"})
        assert again.headers["server-timing"].endswith('desc="cache+default:no_match"')
        # Someone else, without the cookie: nothing.
        other = TestClient(middleware).get("/")
        assert island(other.text) is None and "server-timing" not in other.headers
        # A forged QA cookie: nothing either.
        forged = qa_link("http://testserver/", secret_key="not-the-secret-0123456789")
        client.cookies.set(QA_COOKIE, parse_qs(urlsplit(forged).query)["token"][0])
        page = client.get("/")
        assert island(page.text) is None and "server-timing" not in page.headers
        # Leaving QA mode.
        client.get("/_personalize/qa/exit", follow_redirects=False)


def test_qa_cookies_can_be_turned_off() -> None:
    with TestClient(make_middleware(qa_cookies=False, server_timing=True)) as client:
        link = qa_link("http://testserver/", secret_key=SECRET)
        parts = urlsplit(link)
        answer = client.get(parts.path + "?" + parts.query, follow_redirects=False)
        assert "set-cookie" not in answer.headers
        client.cookies.set(QA_COOKIE, parse_qs(parts.query)["token"][0])
        assert island(client.get("/").text) is None


def test_server_timing_option_for_every_personalized_response() -> None:
    with TestClient(make_middleware(server_timing=True)) as client:
        page = client.get("/", headers={"x-user": "st"})
        assert page.headers["server-timing"].startswith("personalize;dur=")
        assert island(page.text) is None  # the header only, no overlay
        assert "server-timing" not in client.get("/plain").headers  # not personalized


def test_the_data_island_cannot_be_closed_by_a_payload(tmp_path: Path) -> None:
    with TestClient(
        make_middleware(local_experiences=local_file(tmp_path, audience=XSS))
    ) as client:
        page = client.get("/").text
    assert XSS not in page and "<script>alert" not in page
    data = island(page)
    assert data is not None and data["experiences"][0]["audience"] == XSS  # intact as data


def test_the_overlay_assets_are_served_with_their_hashes(tmp_path: Path) -> None:
    middleware = make_middleware(local_experiences=local_file(tmp_path))
    tools = middleware.devtools
    assert tools is not None
    with TestClient(middleware) as client:
        page = client.get("/").text
        link = re.search(r'<link rel="stylesheet" href="([^"]+)" integrity="([^"]+)"', page)
        assert link is not None
        style_path, style_hash = html.unescape(link.group(1)), link.group(2)
        for path, integrity, media in (
            (tools.script_path, tools.script_hash, "text/javascript"),
            (style_path, style_hash, "text/css"),
        ):
            answer = client.get(path)
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith(media)
            assert "immutable" in answer.headers["cache-control"]
            digest = base64.b64encode(hashlib.sha256(answer.content).digest()).decode()
            assert integrity == "sha256-" + digest
            head = client.head(path)
            assert head.status_code == 200 and head.content == b""
            assert client.post(path).status_code == 405
    script = (
        Path(__file__).resolve().parents[1] / "personalize_middleware/devtools/static/overlay.js"
    ).read_text()
    script = re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", script, flags=re.S))  # comments
    # Built with textContent only: no HTML parsing of data, no inline style, no eval.
    for forbidden in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        ".style",
        "eval(",
        "Function(",
    ):
        assert forbidden not in script


def test_script_hashes_name_every_script_of_the_page(tmp_path: Path) -> None:
    seen: list[tuple[str, ...]] = []

    async def page(request: Request) -> Response:
        seen.append(request.state.personalize.script_hashes)
        return PlainTextResponse("ok")

    middleware = PersonalizeMiddleware(
        Starlette(routes=[Route("/", page)]),
        local_experiences=local_file(tmp_path),
        routes={"/": ["hero"]},
        secret_key=SECRET,
        metadata_refresh=None,
    )
    with TestClient(middleware) as client:
        client.get("/")
    assert middleware.tracking is not None and middleware.devtools is not None
    assert seen == [(middleware.tracking.script_hash, middleware.devtools.script_hash)]
