"""Preview links and the debug overlay in real Chromium, against a MoEngage stand-in over
real HTTP, under a strict CSP (no inline script, no inline style).

- A minted preview link, opened as alice and as the email-campaign audience, shows their
  variations and the banner; clicks made while previewing send nothing: the stand-in
  receives ZERO events from the preview. The same browser, out of the preview, sends its
  impression and click, which arrive.
- The overlay (given by a QA link) lists each experience of the page with its source:
  a cache hit, a default after the latency budget ran out, a key that is not Active; it
  counts the impression and the click sent. Screenshot: the test's tmp dir and
  /tmp/overlay.png.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from personalize_middleware import (
    PersonalizeMiddleware,
    PersonalizeSettings,
    PersonalizeTemplates,
    preview_link,
    qa_link,
)
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN
from tests.conftest import require_tool
from tests.support.faulty_upstream import Fault, FaultyUpstream
from tests.support.http_server import run_asgi_server
from tests.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    BeaconTap,
    PageWatch,
    _tools_available,
    person_user_agent,
)

pytestmark = pytest.mark.browser

SECRET = "devtools-browser-secret-0123456789"
WORKSPACE_ID = "WSDEVTOOLS01"
API_SECRET = "devtools-api-secret-0123"

PAGE = """\
<!doctype html>
<html><head><meta charset="utf-8"><title>shop</title></head><body>
<main>
{% experience "hero" as hero %}
<section id="hero"{{ impression(hero) }}>
  <h1>{{ hero.title }}</h1>
  <p id="medium">{{ hero.medium }}</p>
  <button id="buy"{{ track_click(hero, "Buy now") }}>Buy now</button>
</section>
{% else %}<h1>Welcome</h1>{% endexperience %}
{% experience "slow" as slow %}<p id="slow">{{ slow.title }}</p>
{% else %}<p id="slow">slow: the default</p>{% endexperience %}
{% experience "paused" as paused %}<p id="paused">{{ paused.title }}</p>
{% else %}<p id="paused">paused: the default</p>{% endexperience %}
</main>
{{ personalize_script() }}
</body></html>
"""


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
def upstream() -> Iterator[FaultyUpstream]:
    upstream = FaultyUpstream(
        workspace_id=WORKSPACE_ID,
        api_secret=API_SECRET,
        known_keys=("hero", "slow", "paused"),
        key_statuses={"paused": "Paused"},
    )
    with upstream.serve():
        yield upstream
    assert upstream.violations == []


def make_app(upstream: FaultyUpstream, **options: Any) -> PersonalizeMiddleware:
    templates = PersonalizeTemplates(
        env=jinja2.Environment(
            loader=jinja2.DictLoader({"page.html": PAGE}), autoescape=jinja2.select_autoescape()
        )
    )

    async def page(request: Request) -> Response:
        # A strict CSP: scripts only by hash, styles only from this origin (no inline).
        hashes = " ".join(f"'{h}'" for h in request.state.personalize.script_hashes)
        policy = (
            f"default-src 'self'; script-src {hashes or 'none'}; style-src 'self'; "
            "connect-src 'self'; img-src 'self'"
        )
        return templates.TemplateResponse(
            request, "page.html", headers={"Content-Security-Policy": policy}
        )

    settings = PersonalizeSettings(
        workspace_id=WORKSPACE_ID, api_secret=API_SECRET, base_url=upstream.base_url
    )
    options.setdefault("routes", {"/": ["hero"], "/landing": ["hero"]})
    return PersonalizeMiddleware(
        Starlette(routes=[Route("/", page), Route("/landing", page), Route("/warm", page)]),
        settings=settings,
        secret_key=SECRET,
        **options,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll a real condition (events arrive through a batcher on its own interval)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def delivered(upstream: FaultyUpstream) -> list[tuple[str, str, str | None]]:
    """(customer_id, action, b_id) of every action in an events call answered 200."""
    return [
        (element["customer_id"], action["action"], action["attributes"].get("b_id"))
        for request in upstream.requests("events")
        if request.fault is Fault.OK
        for element in request.body["elements"]
        for action in element["actions"]
    ]


def no_csp_errors(watch: PageWatch) -> None:
    assert not [m for m in watch.console if "Content Security Policy" in m], watch.console


def test_preview_as_a_customer_and_an_audience_sends_nothing(
    browser: Any, upstream: FaultyUpstream, tmp_path: Path
) -> None:
    middleware = make_app(upstream, preview=True, metadata_refresh=None, latency_budget=5.0)
    tap = BeaconTap(middleware)
    with run_asgi_server(tap, lifespan="on") as base:
        context = browser.new_context(
            viewport={"width": 1100, "height": 700}, user_agent=person_user_agent(browser)
        )
        context.set_default_timeout(10_000)
        page = context.new_page()
        watch = PageWatch(page)

        # 1. As alice: her variation, the banner, and a click that goes nowhere.
        page.goto(preview_link(base + "/", secret_key=SECRET, customer_id="alice"))
        assert page.url == base + "/"
        assert page.inner_text("#hero h1") == "hero:alice"
        banner = page.locator("#pz-preview-banner")
        assert banner.is_visible()
        assert "Preview as customer alice" in banner.inner_text()
        assert banner.evaluate("e => getComputedStyle(e).position") == "fixed"  # CSS loaded
        page.screenshot(path=str(tmp_path / "preview-alice.png"))
        shutil.copyfile(tmp_path / "preview-alice.png", "/tmp/preview-banner.png")
        page.click("#buy")
        # Nothing on the page can report: no hooks, no tracking script.
        assert page.locator("[data-pz-impression], [data-pz-click]").count() == 0
        assert page.evaluate("window.__personalizeTracking === undefined")

        # 2. As the email-campaign audience (utm_medium=email), on the landing page.
        page.goto(
            preview_link(base + "/landing", secret_key=SECRET, attributes={"utm_medium": "email"})
        )
        assert page.url == base + "/landing"
        assert page.inner_text("#medium") == "email"
        assert page.inner_text("#hero h1").startswith("hero:preview-")
        assert "Preview as utm_medium=email" in page.locator("#pz-preview-banner").inner_text()
        page.click("#buy")
        page.locator("#hero").scroll_into_view_if_needed()
        assert page.evaluate("window.__personalizeTracking === undefined")
        assert tap.beacons == []  # the previewing browser sent no beacon at all

        # 3. Out of the preview (the banner's link): the visitor's own page, tracked.
        page.click("#pz-preview-banner a")
        page.wait_for_selector("#pz-preview-banner", state="detached")
        assert page.url == base + "/landing"
        own = page.inner_text("#hero h1")
        assert own.startswith("hero:") and "alice" not in own and "preview-" not in own
        assert page.inner_text("#medium") == ""
        # A person reads before clicking: the endpoint drops clicks sooner than a reaction
        # time after the page was rendered (TrackingLimits.min_click_delay).
        page.wait_for_timeout(500)
        page.click("#buy")
        assert wait_for(lambda: any(a == ACTION_CLICKED for _, a, _ in delivered(upstream)))
        assert wait_for(lambda: any(a == ACTION_SHOWN for _, a, _ in delivered(upstream)))
        no_csp_errors(watch)
        context.close()
    # The app's shutdown flushed its batcher: everything ever queued has arrived.
    events = delivered(upstream)
    visitor = own.removeprefix("hero:")
    assert sorted(events) == sorted(
        [(visitor, ACTION_SHOWN, None), (visitor, ACTION_CLICKED, "Buy now")]
    )
    assert not [e for e in events if e[0] == "alice" or e[0].startswith("preview-")]
    fetched_for = [r.body["identifiers"]["customer_id"] for r in upstream.requests("fetch")]
    assert fetched_for[0] == "alice" and fetched_for[1].startswith("preview-")
    assert watch.dialogs == []


def test_the_overlay_shows_each_experience_and_what_was_sent(
    browser: Any, upstream: FaultyUpstream, tmp_path: Path
) -> None:
    middleware = make_app(
        upstream,
        routes={"/": ["hero", "slow", "paused"], "/warm": ["hero"]},
        metadata_refresh=300,
        latency_budget=1.0,
    )
    tap = BeaconTap(middleware)
    with run_asgi_server(tap, lifespan="on") as base:
        assert wait_for(
            lambda: middleware.metadata is not None and middleware.metadata.statuses is not None
        )
        context = browser.new_context(
            viewport={"width": 1100, "height": 700}, user_agent=person_user_agent(browser)
        )
        context.set_default_timeout(10_000)
        page = context.new_page()
        watch = PageWatch(page)

        # The QA link: this browser gets the overlay (an ordinary visitor does not).
        page.goto(qa_link(base + "/warm", secret_key=SECRET, label="qa-anna"))
        assert page.url == base + "/warm"
        assert page.locator("#pz-overlay").is_visible()
        hero = page.locator("#pz-overlay tr[data-key='hero']")
        assert hero.locator(".pz-source").inner_text() == "network"

        # Now the upstream hangs: hero comes from the cache, slow times out, paused is
        # not Active (metadata) and is not even asked for.
        upstream.set_fault(Fault.HANG, "fetch")
        started = time.monotonic()
        page.goto(base + "/")
        assert time.monotonic() - started >= 0.9  # the page waited out its 1 s budget
        assert page.inner_text("#slow") == "slow: the default"
        assert page.inner_text("#paused") == "paused: the default"

        def cell(key: str, name: str) -> str:
            text: str = page.locator(f"#pz-overlay tr[data-key='{key}'] .pz-{name}").inner_text()
            return text

        rows = page.locator("#pz-overlay tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.key)"
        )
        assert rows == ["hero", "slow", "paused"]  # the route's order
        assert cell("hero", "source") == "cache"
        assert cell("hero", "variation") != "\u2013" and cell("hero", "audience") == "All Users"
        assert cell("hero", "age").endswith(" s") and cell("hero", "fetch") == "\u2013"
        assert cell("slow", "source") == "default: timeout"
        assert cell("paused", "source") == "default: not_active"
        assert "QA: qa-anna" in page.inner_text("#pz-overlay .pz-overlay-meta")

        # What this page view sends shows up in the overlay.
        page.click("#buy")
        sent = page.locator("#pz-overlay tr[data-key='hero'] .pz-sent")
        sent.filter(has_text="1 impression, 1 click").wait_for()
        log = page.inner_text("#pz-overlay .pz-overlay-log")
        assert "click \u2192 hero: Buy now" in log and "impression \u2192 hero" in log
        assert (
            page.evaluate("getComputedStyle(document.getElementById('pz-overlay')).position")
            == "fixed"
        )  # the stylesheet applied under the CSP

        shot = tmp_path / "overlay.png"
        page.screenshot(path=str(shot))
        shutil.copyfile(shot, "/tmp/overlay.png")

        # Collapsing it keeps the header only.
        page.click("#pz-overlay .pz-overlay-toggle")
        assert not page.locator("#pz-overlay .pz-overlay-table").is_visible()
        no_csp_errors(watch)
        assert watch.dialogs == []

        # An ordinary visitor (another browser context, no QA cookie): no overlay.
        other = browser.new_context(user_agent=person_user_agent(browser)).new_page()
        upstream.set_fault(Fault.OK, "fetch")
        other.goto(base + "/warm")
        assert other.locator("#hero h1").count() == 1
        assert other.locator("#pz-overlay").count() == 0
        context.close()
    assert shot.stat().st_size > 10_000
