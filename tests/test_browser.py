"""End to end in real Chromium: page -> tracking script -> beacon endpoint -> batcher ->
a MoEngage stand-in over real HTTP, under a strict CSP, with an XSS payload in the page."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import jinja2
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from personalize_middleware import PersonalizeMiddleware, PersonalizeSettings, setup_templates
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN
from tests.conftest import require_tool
from tests.support.http_server import run_asgi_server
from tests.support.tracking_helpers import (
    API_SECRET,
    GOOGLEBOT_USER_AGENT,
    WORKSPACE_ID,
    EventsStandIn,
    context_for,
)

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
XSS_TEXT = "<script>alert(1)</script>"
XSS_ATTR = '" onmouseover="alert(1)'

PAGE = """\
<!doctype html>
<html><head><meta charset="utf-8"><title>shop</title></head><body>
{% experience "hero" as hero %}
<section id="hero"{{ impression(hero) }}>
  <h1>{{ hero.Title }}</h1>
  <p id="sub" title="{{ hero.Subtitle }}">{{ hero.Subtitle }}</p>
  <button id="cart"{{ track_click(hero, "Add to Cart") }}><span>Add to Cart</span></button>
  <button id="wish"{{ track_click(hero, "Wishlist") }}>Wishlist</button>
</section>
{% else %}<h1>Default</h1>{% endexperience %}
<div style="height: 4000px">spacer</div>
{% experience "below" as below %}
<section id="below"{{ impression(below) }}>{{ below.Title }}</section>
{% endexperience %}
{{ personalize_script() }}
</body></html>
"""


# A fragment swapped into the page (htmx-style): hooks, no personalize_script().
FRAGMENT = """\
{% experience "hero" as hero %}
<div id="more"><button id="more-buy"{{ track_click(hero, "Fragment buy") }}>Buy</button></div>
{% endexperience %}"""


def _tools_available() -> bool:
    return os.path.exists(CHROMIUM) and importlib.util.find_spec("playwright") is not None


def person_user_agent(browser: Any) -> str:
    """This Chromium's user agent as a person's Chrome sends it. Headless Chromium says
    "HeadlessChrome", which is on the crawler list (automation is not a person): the
    tests that play a person use this one."""
    return (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        f"Chrome/{browser.version} Safari/537.36"
    )


def make_app(standin_url: str, *, csp: bool = True, **options: Any) -> Starlette:
    templates = Jinja2Templates(
        env=jinja2.Environment(
            loader=jinja2.DictLoader({"page.html": PAGE, "fragment.html": FRAGMENT}),
            autoescape=jinja2.select_autoescape(),
        )
    )
    setup_templates(templates)

    async def page(request: Request) -> Response:
        tracking = request.state.personalize.tracking
        # Strict CSP: no inline script, the tracking script allowed by its hash only.
        policy = (
            f"default-src 'self'; script-src '{tracking.script_hash}'; "
            "style-src 'unsafe-inline'; connect-src 'self'"
        )
        headers = {"Content-Security-Policy": policy} if csp else None
        return templates.TemplateResponse(request, "page.html", headers=headers)

    async def fragment(request: Request) -> Response:
        return templates.TemplateResponse(request, "fragment.html")

    settings = PersonalizeSettings(
        workspace_id=WORKSPACE_ID, api_secret=API_SECRET, base_url=standin_url + "/v1"
    )
    return Starlette(
        routes=[Route("/", page), Route("/fragment", fragment)],
        middleware=[
            Middleware(
                PersonalizeMiddleware,
                settings=settings,
                routes={"/": ["hero", "below"], "/fragment": ["hero"]},
                secret_key="browser-test-secret-0123456789",
                metadata_refresh=None,
                latency_budget=5.0,  # a cold CI machine must not turn this into a default
                **options,
            )
        ],
    )


@pytest.fixture
def browser() -> Iterator[Any]:
    require_tool(_tools_available(), "Chromium (/usr/bin/chromium) and Playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def standin() -> Iterator[tuple[EventsStandIn, str]]:
    server = EventsStandIn(
        {
            "hero": {"Title": XSS_TEXT, "Subtitle": XSS_ATTR},
            "below": {"Title": "Free shipping"},
        }
    )
    with run_asgi_server(server.app()) as url:
        yield server, url
    assert server.violations == []  # every call, fetches included, was spec-valid


class BeaconTap:
    """Records every beacon the app receives (time, tokens): what the script itself sent,
    before the endpoint's replay dedupe. sendBeacon bodies are not visible to Playwright."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.beacons: list[tuple[float, list[str]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/_personalize/events"):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self.beacons.append((time.monotonic(), json.loads(body)["events"]))
        replayed = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Any:
            return replayed.pop() if replayed else await receive()

        await self.app(scope, replay, send)

    @property
    def tokens(self) -> list[str]:
        return [token for _, tokens in self.beacons for token in tokens]


class PageWatch:
    """Dialogs and console messages of a page."""

    def __init__(self, page: Any) -> None:
        self.dialogs: list[str] = []
        self.console: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", lambda message: self.console.append(message.text))

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def by_key(delivered: list[dict[str, Any]], action: str) -> list[str]:
    return [
        d["attributes"].get("b_id") or d["attributes"]["cid"]
        for d in delivered
        if d["action"] == action
    ]


def test_impressions_clicks_and_xss_end_to_end(
    browser: Any, standin: tuple[EventsStandIn, str]
) -> None:
    server, standin_url = standin
    hero_cid, below_cid = context_for("hero")["cid"], context_for("below")["cid"]
    tap = BeaconTap(make_app(standin_url))
    with run_asgi_server(tap, lifespan="on") as app_url:
        context = browser.new_context(
            viewport={"width": 1280, "height": 720}, user_agent=person_user_agent(browser)
        )
        context.set_default_timeout(10_000)
        page = context.new_page()
        watch = PageWatch(page)
        page.goto(app_url + "/")

        # The payload is text, in the text and in the attribute.
        assert page.locator("#hero h1").text_content() == XSS_TEXT
        assert page.locator("#sub").get_attribute("title") == XSS_ATTR
        assert page.locator("#sub").text_content() == XSS_ATTR
        page.hover("#sub")

        # Above the fold: one impression; the far-below experience is not reported.
        assert server.wait_for(lambda d: hero_cid in by_key(d, ACTION_SHOWN))
        assert len(tap.beacons) == 1 and len(tap.beacons[0][1]) == 1
        assert by_key(server.delivered, ACTION_SHOWN) == [hero_cid]

        # Scrolled into view: reported after a continuous second in view.
        scrolled_at = time.monotonic()
        page.locator("#below").scroll_into_view_if_needed()
        assert server.wait_for(lambda d: below_cid in by_key(d, ACTION_SHOWN))
        assert len(tap.beacons) == 2
        assert tap.beacons[1][0] - scrolled_at >= 0.95

        # Two buttons of the same experience: two clicks with their b_ids; a second click
        # on the same button is not reported again.
        page.locator("#cart span").click()  # a click inside the element counts for it
        page.locator("#wish").click()
        page.locator("#cart").click()
        assert server.wait_for(lambda d: len(by_key(d, ACTION_CLICKED)) == 2)
        assert sorted(by_key(server.delivered, ACTION_CLICKED)) == ["Add to Cart", "Wishlist"]

        # A back/forward-cache restore continues the same page view: nothing re-reported.
        page.evaluate(
            "window.dispatchEvent(new PageTransitionEvent('pageshow', {persisted: true}))"
        )
        page.locator("#hero").scroll_into_view_if_needed()
        page.locator("#below").scroll_into_view_if_needed()
        context.close()  # pagehide: whatever is queued is flushed
        assert not [m for m in watch.console if "Content Security Policy" in m], watch.console
    # The app's lifespan shutdown flushed its batcher: every event has arrived by now.
    delivered = server.delivered
    assert sorted(by_key(delivered, ACTION_SHOWN)) == sorted([hero_cid, below_cid])
    assert sorted(by_key(delivered, ACTION_CLICKED)) == ["Add to Cart", "Wishlist"]
    assert len({d["moe_event_uuid"] for d in delivered}) == len(delivered) == 4
    assert len({d["customer_id"] for d in delivered}) == 1  # the anonymous visitor's id
    assert len(tap.tokens) == 4  # the script itself sent each event once
    assert watch.dialogs == []  # no injected script ran


def test_impression_needs_one_continuous_visible_second(
    browser: Any, standin: tuple[EventsStandIn, str]
) -> None:
    server, standin_url = standin
    hero_cid = context_for("hero")["cid"]
    tap = BeaconTap(make_app(standin_url))
    with run_asgi_server(tap, lifespan="on") as app_url:
        context = browser.new_context(
            viewport={"width": 1280, "height": 720}, user_agent=person_user_agent(browser)
        )
        # A switchable page visibility (the tab starts hidden).
        context.add_init_script(
            "window.__hidden = true;"
            "Object.defineProperty(Document.prototype, 'visibilityState', "
            "{configurable: true, get() { return window.__hidden ? 'hidden' : 'visible'; }});"
        )
        context.set_default_timeout(10_000)
        page = context.new_page()

        def visible(flag: bool) -> float:
            page.evaluate(
                "flag => { window.__hidden = !flag;"
                " document.dispatchEvent(new Event('visibilitychange')); }",
                flag,
            )
            return time.monotonic()

        page.goto(app_url + "/")
        page.wait_for_timeout(1500)  # the scenario: 1.5 s in view, but in a hidden tab
        visible(True)
        page.wait_for_timeout(500)  # half a second visible, then hidden again
        visible(False)
        page.wait_for_timeout(300)
        shown_again = visible(True)
        assert server.wait_for(lambda d: hero_cid in by_key(d, ACTION_SHOWN))
        assert tap.beacons[0][0] - shown_again >= 0.95
        context.close()
    assert by_key(server.delivered, ACTION_SHOWN) == [hero_cid]


def test_xss_payload_runs_no_script_even_without_csp(
    browser: Any, standin: tuple[EventsStandIn, str]
) -> None:
    """Escaping alone keeps the payload inert (the CSP above is a second line)."""
    _server, standin_url = standin
    with run_asgi_server(make_app(standin_url, csp=False), lifespan="on") as app_url:
        context = browser.new_context(user_agent=person_user_agent(browser))
        context.set_default_timeout(10_000)
        page = context.new_page()
        watch = PageWatch(page)
        page.goto(app_url + "/")
        page.hover("#sub")
        page.hover("#hero h1")
        assert page.locator("#hero h1").text_content() == XSS_TEXT
        assert page.evaluate("document.querySelectorAll('body script').length") == 1  # ours
        assert page.evaluate("document.querySelector('#sub').hasAttribute('onmouseover')") is False
        assert watch.dialogs == []
        context.close()


@pytest.mark.parametrize("send_user_agent", [True, False])
def test_a_crawler_running_the_page_is_not_counted(
    browser: Any, standin: tuple[EventsStandIn, str], send_user_agent: bool
) -> None:
    """Googlebot renders pages in Chromium and runs their scripts: it scrolls, waits and
    clicks here like the person above, and nothing of it reaches MoEngage. Its page view
    gets no hooks, whether or not the user agent is sent to MoEngage (a crawler's beacon
    that arrives anyway is ignored by the endpoint: tests/test_tracking_bots.py)."""
    server, standin_url = standin
    tap = BeaconTap(make_app(standin_url, send_user_agent=send_user_agent))
    with run_asgi_server(tap, lifespan="on") as app_url:
        context = browser.new_context(
            viewport={"width": 1280, "height": 720}, user_agent=GOOGLEBOT_USER_AGENT
        )
        context.set_default_timeout(10_000)
        page = context.new_page()
        page.goto(app_url + "/")
        hooked = page.locator("[data-pz-impression]").count()
        page.wait_for_timeout(1500)  # the hero in view for 1.5 s
        page.locator("#below").scroll_into_view_if_needed()
        page.wait_for_timeout(1500)
        page.locator("#hero").scroll_into_view_if_needed()
        page.locator("#cart").click()
        page.locator("#wish").click()
        page.wait_for_timeout(300)
        context.close()  # pagehide: the script flushes what it has
    # The lifespan shutdown flushed the batcher: anything accepted would be here now.
    assert server.delivered == []
    # The page view knows its User-Agent even when it is not sent to MoEngage
    # (send_user_agent=False): no hooks either way, so the script has nothing to report.
    assert hooked == 0 and tap.beacons == []


def test_a_fragment_s_hooks_report_with_their_own_manifest(
    browser: Any, standin: tuple[EventsStandIn, str]
) -> None:
    """A fragment rendered as its own page view and inserted into the page (what htmx
    does): its hooks' indexes go with the manifest appended to the fragment, the page's
    with the page's; both clicks arrive, each once."""
    server, standin_url = standin
    tap = BeaconTap(make_app(standin_url, csp=False))
    with run_asgi_server(tap, lifespan="on") as app_url:
        context = browser.new_context(user_agent=person_user_agent(browser))
        context.set_default_timeout(10_000)
        page = context.new_page()
        page.goto(app_url + "/")
        page.evaluate(
            "fetch('/fragment').then(r => r.text())"
            ".then(t => document.body.insertAdjacentHTML('beforeend', t))"
        )
        page.wait_for_selector("#more-buy")
        assert page.locator("template[data-pz-page]").count() == 1
        page.wait_for_timeout(300)  # a person reads before clicking (min_click_delay)
        page.locator("#more-buy").click()
        page.locator("#wish").click()
        assert server.wait_for(lambda d: len(by_key(d, ACTION_CLICKED)) == 2)
        context.close()
    assert sorted(by_key(server.delivered, ACTION_CLICKED)) == ["Fragment buy", "Wishlist"]
    clicks = [t for t in tap.tokens if "~" in t]
    assert len({t.partition("~")[0] for t in clicks}) == 2  # two page views' indexes
