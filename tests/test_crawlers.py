"""Known crawlers: not tracked (tests/test_tracking_bots.py, test_tracking_abuse.py) and,
with ``crawlers="defaults"``, served the defaults without spending the upstream budget."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from personalize_middleware import ConfigurationError, PersonalizeMiddleware
from tests.support.tracking_helpers import BROWSER_USER_AGENT, StaticBackend

GOOGLEBOT = (
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; "
    "+http://www.google.com/bot.html) Chrome/120.0.0.0 Safari/537.36"
)


async def page(request: Request) -> PlainTextResponse:
    handle = request.state.personalize
    hero = await handle.get("hero")
    extra = await handle.get("promo")  # a runtime key: no call for a crawler either
    return PlainTextResponse(
        f"{hero.get('Title') if hero else 'default'}|{extra.get('Title') if extra else '-'}"
    )


def site(backend: StaticBackend, **options: object) -> Starlette:
    app = Starlette(routes=[Route("/", page)])
    app.add_middleware(
        PersonalizeMiddleware,
        backend=backend,
        routes={"/": ["hero"]},
        secret_key="crawler-tests-secret-0123456",
        metadata_refresh=None,
        latency_budget=10.0,
        **options,
    )
    return app


@pytest.mark.parametrize("send_user_agent", [True, False])
def test_crawlers_get_the_defaults_without_an_upstream_call(send_user_agent: bool) -> None:
    backend = StaticBackend({"hero": {"Title": "Hi"}, "promo": {"Title": "Sale"}})
    app = site(backend, crawlers="defaults", send_user_agent=send_user_agent)
    with TestClient(app) as client:
        assert client.get("/", headers={"user-agent": GOOGLEBOT}).text == "default|-"
        assert backend.fetches == []
        assert client.get("/", headers={"user-agent": BROWSER_USER_AGENT}).text == "Hi|Sale"
        assert backend.fetches != []


def test_by_default_crawlers_see_what_people_see() -> None:
    backend = StaticBackend({"hero": {"Title": "Hi"}})
    with TestClient(site(backend)) as client:
        assert client.get("/", headers={"user-agent": GOOGLEBOT}).text == "Hi|-"


def test_a_wrong_crawlers_option_is_a_configuration_error() -> None:
    middleware = PersonalizeMiddleware(Starlette(), backend=StaticBackend({}), crawlers="block")  # type: ignore[typeddict-item]
    error = middleware.configuration_error  # raised by the start-up (see _options)
    assert isinstance(error, ConfigurationError) and error.field == "crawlers"
    assert "'personalize' or 'defaults'" in str(error)
