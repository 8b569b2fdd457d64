"""The testing kit (``personalize_middleware.testing``), used as an app's own tests would
use it: the example shop, the ``moengage`` fixture, no network and no MoEngage."""

from __future__ import annotations

import re
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from example_app.main import create_app
from personalize_middleware import BadRequestError, PersonalizeMiddleware
from personalize_middleware.testing import FakeMoEngage, click, override, view

SECRET = "testing-kit-secret-0123456789"


def shop(budget: float = 30.0) -> TestClient:
    return TestClient(create_app(secret_key=SECRET, latency_budget=budget))


def hero(page_text: str) -> list[str]:
    return re.findall(r"<h1>(.*?)</h1>", page_text)


def login(client: TestClient, customer: str) -> str:
    response = client.post("/login", data={"customer_id": customer})
    assert response.status_code == 200
    return response.text


def test_a_pin_for_everyone_and_one_for_a_customer(moengage: FakeMoEngage) -> None:
    moengage.pin("home-hero", {"Title": "Hello, everyone"})
    moengage.pin("home-hero", {"Title": "Welcome back, Alice"}, customer_id="alice")
    with shop() as client:
        assert hero(client.get("/").text) == ["Hello, everyone"]
        assert hero(login(client, "alice")) == ["Welcome back, Alice"]
        client.post("/logout")
        assert hero(login(client, "bob")) == ["Hello, everyone"]
    # Every page asked for the route's keys in one call.
    assert all(set(keys) >= {"home-hero"} for _, keys in moengage.fetches if "home-hero" in keys)


def test_nothing_pinned_renders_the_defaults(moengage: FakeMoEngage) -> None:
    with shop() as client:
        assert hero(client.get("/").text) == ["Welcome to the shop"]


def test_a_slow_upstream_still_renders_within_the_budget(moengage: FakeMoEngage) -> None:
    moengage.pin("home-hero", {"Title": "Too late"})
    moengage.slow(2.0)
    with shop(budget=0.1) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert hero(page.text) == ["Welcome to the shop"]
        assert page.elapsed.total_seconds() < 1.5


@pytest.mark.parametrize("failure", [None, BadRequestError("refused")])
def test_a_failing_upstream_renders_the_defaults(
    moengage: FakeMoEngage, failure: BadRequestError | None
) -> None:
    moengage.pin("home-hero", {"Title": "Unreachable"})
    moengage.fail(failure)
    with shop() as client:
        page = client.get("/")
        assert page.status_code == 200
        assert hero(page.text) == ["Welcome to the shop"]
    moengage.recover()
    with shop() as client:
        assert hero(client.get("/").text) == ["Unreachable"]


def test_impressions_and_clicks_are_tracked_once(moengage: FakeMoEngage) -> None:
    moengage.pin("product-upsell", {"Headline": "Pair it with a hat", "Product": "Wool hat"})
    with shop() as client:
        login(client, "alice")
        page = client.get("/products/winter-jacket")
        assert "Pair it with a hat" in page.text
        assert view(client, page) == 204
        assert click(client, page, "Add to Cart") == 204
        assert click(client, page, "Add to Cart") == 204  # a double click: one event
        moengage.assert_tracked("impression", "product-upsell", customer_id="alice")
        moengage.assert_tracked("click", "product-upsell", b_id="Add to Cart")
    moengage.assert_not_tracked("click", "home-hero")
    assert moengage.actions("click", b_id="Wishlist") == []


def test_assert_tracked_says_what_it_got(moengage: FakeMoEngage) -> None:
    with pytest.raises(AssertionError, match=r"expected 1 click\(s\) of 'home-hero'.*got 0"):
        moengage.assert_tracked("click", "home-hero", timeout=0.05)


def test_view_needs_hooks_on_the_page(moengage: FakeMoEngage) -> None:
    with shop() as client, pytest.raises(AssertionError, match="no impression hooks"):
        view(client, client.get("/landing"))


def test_the_override_replaces_the_backend_and_is_removed_after() -> None:
    fake = FakeMoEngage()
    with override(fake):
        inside = PersonalizeMiddleware(lambda s, r, c: None, secret_key=SECRET)  # type: ignore[arg-type, return-value]
        assert inside.backend is fake and not inside.local_mode
    outside = PersonalizeMiddleware(lambda s, r, c: None, secret_key=SECRET)  # type: ignore[arg-type, return-value]
    assert outside.backend is not fake and outside.local_mode


def test_the_plugin_gives_any_project_the_fixture(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's project: its own app, its own test, only the installed plugin.
    pytester.makepyfile(
        test_users_app=textwrap.dedent(
            """
            from starlette.applications import Starlette
            from starlette.requests import Request
            from starlette.responses import PlainTextResponse
            from starlette.routing import Route
            from starlette.testclient import TestClient

            from personalize_middleware import PersonalizeMiddleware

            async def home(request: Request) -> PlainTextResponse:
                hero = await request.state.personalize.get("hero")
                return PlainTextResponse(hero.get("title") if hero else "default")

            def test_pinned(moengage):
                moengage.pin("hero", {"title": "pinned"})
                app = Starlette(routes=[Route("/", home)])
                app.add_middleware(PersonalizeMiddleware, secret_key="x" * 16)
                with TestClient(app) as client:
                    assert client.get("/").text == "pinned"
            """
        )
    )
    # Entry points off, the plugin by name: what the entry point loads, and nothing else.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess(
        "-p", "personalize_middleware.testing.plugin", "-p", "anyio", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1)


def test_the_plugin_is_registered_as_a_pytest_entry_point() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("personalize_middleware") == "personalize_middleware.testing.plugin"


def test_the_complete_test_in_docs_testing_md_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    python = re.findall(r"```python\n(.*?)```", doc, re.S)
    template = re.findall(r"```html\+jinja\n(.*?)```", doc, re.S)
    assert len(python) == 1 and len(template) == 1
    pytester.makepyfile(test_home=python[0])
    (pytester.path / "templates").mkdir()
    (pytester.path / "templates" / "home.html").write_text(template[0])
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess(
        "-p", "personalize_middleware.testing.plugin", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2)
