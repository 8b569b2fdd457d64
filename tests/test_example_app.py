"""The example shop, in local mode and against the MoEngage-compatible local server."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from example_app.main import EXPERIENCES_FILE, create_app
from personalize_middleware import (
    LocalBackend,
    PersonalizeSettings,
    TrackingLimits,
    create_local_server,
)
from tests.support.http_server import run_asgi_server
from tests.support.tracking_helpers import beacon as beacon_body

SECRET = "example-test-secret-0123456789"
#: These tests are about what pages show, not about the budget: a loaded CI machine must
#: not turn a slow fetch into a default.
BUDGET = 30.0
WORKSPACE = "EXAMPLEWS1"
API_SECRET = "example-api-secret"


def headings(html: str) -> dict[str, list[str]]:
    return {
        "h1": re.findall(r"<h1>(.*?)</h1>", html),
        "h2": re.findall(r"<h2>(.*?)</h2>", html),
        "h3": re.findall(r"<h3>(.*?)</h3>", html),
    }


def tour(app: FastAPI) -> dict[str, dict[str, list[str]]]:
    """What a visitor sees on each page as anonymous, alice, bob, and from the newsletter."""
    seen: dict[str, dict[str, list[str]]] = {}
    with TestClient(app) as client:
        seen["landing"] = headings(client.get("/landing").text)
        seen["landing-email"] = headings(client.get("/landing?utm_medium=email").text)
        for customer in ("alice", "bob"):
            response = client.post("/login", data={"customer_id": customer})
            assert response.status_code == 200  # redirected to the home page
            seen[customer] = headings(response.text)
            seen[customer + "-product"] = headings(client.get("/products/winter-jacket").text)
            client.post("/logout")
    return seen


def test_two_demo_customers_see_different_hero_variations() -> None:
    seen = tour(create_app(local_file=EXPERIENCES_FILE, secret_key=SECRET, latency_budget=BUDGET))
    assert seen["alice"]["h1"] == ["Welcome back — your gold perks are waiting"]
    assert seen["bob"]["h1"] == ["Silver week: double points on everything"]


def test_utm_medium_email_shows_the_email_landing_variant() -> None:
    seen = tour(create_app(local_file=EXPERIENCES_FILE, secret_key=SECRET, latency_budget=BUDGET))
    assert seen["landing"]["h1"] == ["Our newsletter"]  # the default: nothing matched
    assert seen["landing-email"]["h1"] == ["Thanks for reading our newsletter: 15% off today"]


def test_scheduled_experiences_render_their_default_and_bad_logins_are_clear() -> None:
    app = create_app(local_file=EXPERIENCES_FILE, secret_key=SECRET, latency_budget=BUDGET)
    with TestClient(app) as client:
        home = client.get("/")
        assert "The winter sale is scheduled" in home.text
        assert home.headers["cache-control"] == "private, no-store"
        bad = client.post("/login", data={"customer_id": "<script>alert(1)</script>"})
        assert bad.status_code == 400 and "Unknown demo customer" in bad.text
        assert client.post("/login", data={}).status_code == 422
        assert client.get("/products/nope").status_code == 404


def test_clicking_add_to_cart_shows_up_on_the_local_report() -> None:
    app = create_app(local_file=EXPERIENCES_FILE, secret_key=SECRET, latency_budget=BUDGET)
    with TestClient(app) as client:
        page = client.get("/products/winter-jacket").text
        token = re.search(r'id="add-to-cart" data-pz-click="([^"]+)"', page)
        assert token is not None
        # A shopper sees the page before clicking: the endpoint drops clicks sooner than
        # a human reaction time after render (not a race: the rule under test is time).
        time.sleep(TrackingLimits().min_click_delay)
        beacon = client.post(
            "/_personalize/events",
            json=beacon_body(page, [token.group(1)]),
            headers={"origin": "http://testserver", "sec-fetch-site": "same-origin"},
        )
        assert beacon.status_code == 204
        deadline = time.monotonic() + 10
        while True:  # the batcher flushes on a short interval
            report = client.get("/_personalize/report")
            if "Add to Cart" in report.text or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert report.status_code == 200
    assert "Add to Cart" in report.text
    assert "Product page upsell" in report.text


def test_regression_the_visible_add_to_cart_button_is_the_tracked_one() -> None:
    """The product page showed an untracked "Add ... to cart" button first and the tracked
    one below a blank 120vh band, with nothing saying why."""
    app = create_app(local_file=EXPERIENCES_FILE, secret_key=SECRET, latency_budget=BUDGET)
    with TestClient(app) as client:
        page = client.get("/products/winter-jacket").text
    main = page[page.index("<main>") : page.index("</main>")]
    buttons = re.findall(r"<button[^>]*>", main)
    assert 'id="add-to-cart"' in buttons[0] and "data-pz-click=" in buttons[0]
    assert all("data-pz-click=" in button for button in buttons), buttons
    demo = main.index('id="below-the-fold-demo"')
    assert main.index('id="add-to-cart"') < demo < main.index('class="spacer"')
    assert "counts an\n    impression only when at least half" in main[demo:]
    assert main.index('class="spacer"') < main.index('id="upsell-below-the-fold"')


def why_notes(html: str) -> dict[str, str]:
    """Each "why am I seeing this" note, by experience key, as plain text."""
    notes = re.findall(r'<details class="why" data-why="([^"]+)">(.*?)</details>', html, re.S)
    return {key: " ".join(re.sub(r"<[^>]+>", "", text).split()) for key, text in notes}


def test_every_personalized_block_says_why_the_visitor_sees_it() -> None:
    app = create_app(local_file=EXPERIENCES_FILE, secret_key=SECRET, latency_budget=BUDGET)
    with TestClient(app) as client:
        client.post("/login", data={"customer_id": "alice"})
        home = client.get("/").text
        product = client.get("/products/winter-jacket").text
        landing = client.get("/landing").text
    notes = why_notes(home)
    assert notes["home-hero"] == (
        "Why am I seeing this? Experience Homepage hero banner (home-hero), "
        "audience Gold members, variation 11."
    )
    assert "audience Everyone else" in notes["sidebar-promo"]
    for html in (home, product):
        blocks = len(re.findall(r"data-pz-impression=", html))
        assert blocks == html.count('<details class="why"'), html
    assert why_notes(product)["product-upsell"].startswith(
        "Why am I seeing this? Experience Product page upsell (product-upsell), audience All Users"
    )
    assert (
        "The default content: nothing of landing-hero matched you"
        in why_notes(landing)["landing-hero"]
    )


def test_example_app_against_the_local_moengage_server_over_http_gets_the_same_pages() -> None:
    in_process = tour(
        create_app(local_file=EXPERIENCES_FILE, secret_key=SECRET, latency_budget=BUDGET)
    )
    server = create_local_server(
        LocalBackend(Path(EXPERIENCES_FILE)), workspace_id=WORKSPACE, api_secret=API_SECRET
    )
    with run_asgi_server(server) as base_url:
        settings = PersonalizeSettings(
            workspace_id=WORKSPACE, api_secret=API_SECRET, base_url=base_url + "/v1"
        )
        over_http = tour(create_app(settings, secret_key=SECRET, latency_budget=BUDGET))
    assert over_http == in_process
    assert over_http["alice"]["h1"] != over_http["bob"]["h1"]


@pytest.mark.parametrize("path", ["/", "/products/winter-jacket", "/landing"])
def test_pages_render_defaults_when_moengage_is_unreachable(path: str) -> None:
    settings = PersonalizeSettings(
        workspace_id=WORKSPACE,
        api_secret=API_SECRET,
        base_url="http://127.0.0.1:9/v1",
        connect_timeout=0.2,
    )
    with TestClient(create_app(settings, secret_key=SECRET, latency_budget=BUDGET)) as client:
        response = client.get(path)
    assert response.status_code == 200
    assert "data-pz-impression" not in response.text
