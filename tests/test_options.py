"""Options: the groups and the flat names of earlier releases, one-line errors that fail
start-up, which mode the environment means, who sees the report, the visitor cookie."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from personalize_middleware import (
    AttributeOptions,
    CacheOptions,
    ConfigurationError,
    CookieOptions,
    Identity,
    LocalBackend,
    PersonalizeMiddleware,
    PersonalizeSettings,
    TrackingOptions,
)
from personalize_middleware.local import sample_file_path
from tests.support.fake_backend import FakeBackend

SECRET = "options-suite-secret-key-0123456789"
CREDENTIALS = {"MOENGAGE_WORKSPACE_ID": "WS_OPTIONS", "MOENGAGE_API_SECRET": "api-secret-1"}
SETTINGS = PersonalizeSettings(workspace_id="WS_OPTIONS", api_secret="api-secret-1")


@pytest.fixture(autouse=True)
def no_moengage_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MOENGAGE_WORKSPACE_ID",
        "MOENGAGE_API_SECRET",
        "MOENGAGE_DATA_CENTER",
        "MOENGAGE_BASE_URL",
        "MOENGAGE_REDIS_URL",
    ):
        monkeypatch.delenv(name, raising=False)


async def page(request: Request) -> Response:
    await request.state.personalize.wait()
    return PlainTextResponse(",".join(sorted(request.state.personalize.experiences)))


def build(**options: Any) -> PersonalizeMiddleware:
    options.setdefault("secret_key", SECRET)
    return PersonalizeMiddleware(Starlette(routes=[Route("/", page)]), **options)


def error_of(**options: Any) -> ConfigurationError:
    error = build(**options).configuration_error
    assert isinstance(error, ConfigurationError), options
    return error


# -- groups and flat names --------------------------------------------------------------------


def test_flat_names_of_earlier_releases_map_onto_the_groups() -> None:
    flat = build(
        backend=FakeBackend(),
        cache_ttl=30,
        stale_while_revalidate=5,
        cache_maxsize=10,
        send_user_agent=False,
        query_params=["utm_medium"],
        visitor_cookie="vid",
        tracking_prefix="/t",
        impressions="server",
    )
    grouped = build(
        backend=FakeBackend(),
        cache=CacheOptions(ttl=30, stale_while_revalidate=5, maxsize=10),
        attributes=AttributeOptions(user_agent=False, query_params=["utm_medium"]),
        cookie=CookieOptions(name="vid"),
        tracking=TrackingOptions(prefix="/t", impressions="server"),
    )
    for middleware in (flat, grouped):
        assert middleware.configuration_error is None
        assert middleware.store.ttl == 30 and middleware.store.swr_until == 35
        assert middleware.attributes.user_agent is False
        assert middleware.attributes.query_params == frozenset({"utm_medium"})
        assert middleware.visitor_cookie.name == "vid"
        assert middleware.tracking is not None and middleware.tracking.prefix == "/t"
        assert middleware.tracking.impressions == "server"


@pytest.mark.parametrize(
    ("options", "line"),
    [
        ({"latency_budget": "fast"}, "latency_budget='fast': expected a positive number"),
        ({"latency_budget": 150}, "latency_budget=150: expected seconds, at most 60"),
        ({"latency_budgt": 0.2}, "latency_budgt=0.2: unknown option; did you mean latency_budget?"),
        ({"impressions": "browser"}, "impressions='browser': expected 'client' or 'server'"),
        ({"routes": ["hero-banner"]}, "routes=['hero-banner']: expected a dict of path pattern"),
        ({"routes": {"/": "hero-banner"}}, "routes['/']='hero-banner': expected a list of keys"),
        ({"cache": CacheOptions(ttl=-1)}, "cache.ttl=-1: expected a positive number of seconds"),
        ({"cache_ttl": 1, "cache": CacheOptions()}, "cache_ttl=1: expected either cache_ttl="),
        ({"cookie": CookieOptions(same_site="nope")}, "cookie.same_site='nope': expected 'lax'"),  # type: ignore[arg-type]
        ({"cookie": CookieOptions(path="no-slash")}, "cookie.path='no-slash': expected a path"),
        (
            {"cookie": CookieOptions(same_site="none", https_only=False)},
            "cookie.https_only=False: expected True or None with same_site='none'",
        ),
        ({"cookie": {"domain": "x"}}, "cookie={'domain': 'x'}: expected CookieOptions(...)"),
        ({"tracking": "yes"}, "tracking='yes': expected True, False, TrackingOptions"),
        ({"report": "yes"}, "report='yes': expected None, True, False or an authorize"),
        ({"exclude_paths": "/static"}, "exclude_paths='/static': expected a list of path"),
        ({"send_user_agent": "no"}, "send_user_agent='no': expected True or False"),
        ({"secret_key": "..."}, "secret_key=<3 characters>: expected at least 16 characters"),
        ({"trusted_proxies": ["proxy"]}, "trusted_proxies='proxy': expected IP addresses"),
        ({"settings": SETTINGS, "backend": FakeBackend()}, "settings=PersonalizeSettings("),
    ],
)
def test_a_mistake_is_one_line_naming_the_option_the_value_and_what_is_expected(
    options: dict[str, Any], line: str
) -> None:
    message = str(error_of(**options))
    assert line in message, message
    assert "\n" not in message


def test_positional_options_are_refused_at_start_up_not_with_a_type_error() -> None:
    middleware = PersonalizeMiddleware(Starlette(), {"/": ["hero-banner"]})  # type: ignore[arg-type]
    assert "keyword arguments only" in str(middleware.configuration_error)


@pytest.mark.anyio
async def test_starlettes_lazily_built_middleware_fails_the_lifespan() -> None:
    """Starlette builds the middleware inside this first ASGI call: the mistake must come
    out as ``lifespan.startup.failed`` (what stops uvicorn), and as the exception."""
    app = Starlette(middleware=[Middleware(PersonalizeMiddleware, latency_budget="fast")])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        sent.append(message)

    with pytest.raises(ConfigurationError, match="latency_budget='fast'"):
        await app({"type": "lifespan", "state": {}}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "latency_budget='fast': expected a positive number" in sent[0]["message"]


@pytest.mark.anyio
async def test_the_failed_lifespan_message_is_one_line() -> None:
    middleware = build(local_experiences="missing.yaml")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        sent.append(message)

    with pytest.raises(ConfigurationError):
        await middleware({"type": "lifespan", "state": {}}, receive, send)
    assert sent == [
        {
            "type": "lifespan.startup.failed",
            "message": "personalize-middleware: configuration error: "
            + str(middleware.configuration_error),
        }
    ]
    assert sent[0]["message"].startswith(
        "personalize-middleware: configuration error: local_experiences='missing.yaml': "
        "no such file in "
    )


@pytest.mark.anyio
async def test_without_a_lifespan_every_request_raises_the_same_mistake() -> None:
    app = Starlette(
        routes=[Route("/", page)],
        middleware=[Middleware(PersonalizeMiddleware, impressions="browser")],
    )
    # No lifespan, like uvicorn --lifespan off: the first request starts the middleware.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(2):
            with pytest.raises(ConfigurationError, match="impressions='browser'"):
                await client.get("/")


# -- mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment", "needle"),
    [
        (
            {"MOENGAGE_WORKSPACE_ID": "WS"},
            "MOENGAGE_WORKSPACE_ID is set but MOENGAGE_API_SECRET is not",
        ),
        (
            {"MOENGAGE_API_SECRET": "s"},
            "MOENGAGE_API_SECRET is set but MOENGAGE_WORKSPACE_ID is not",
        ),
        (
            {"MOENGAGE_DATA_CENTER": "02", "MOENGAGE_REDIS_URL": "redis://x"},
            "MOENGAGE_DATA_CENTER and MOENGAGE_REDIS_URL are set but MOENGAGE_WORKSPACE_ID "
            "and MOENGAGE_API_SECRET are not",
        ),
    ],
)
def test_regression_a_half_set_environment_is_an_error_not_local_mode(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], needle: str
) -> None:
    """MOENGAGE_WORKSPACE_ID without the secret served the sample file and a public
    report, in what was meant to be production."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    middleware = build()
    assert needle in str(middleware.configuration_error)
    assert middleware.local_mode is False
    with pytest.raises(ConfigurationError, match=needle):
        PersonalizeSettings.from_env_if_configured()


def test_the_environment_picks_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    local = build()
    assert local.local_mode and local.local_source == sample_file_path()
    assert local.report_path == "/_personalize/report"
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    remote = build()
    assert not remote.local_mode and remote.report_path is None
    assert type(remote.backend).__name__ == "PersonalizeClient"
    # An explicit local file while credentials are set: which one was meant? Say so.
    assert "no local file while MOENGAGE_WORKSPACE_ID" in str(
        error_of(local_experiences=sample_file_path())
    )


@pytest.mark.anyio
async def test_local_mode_says_so_once_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="personalize_middleware")
    middleware = build(metadata_refresh=None)  # no secret_key warning either: one line
    middleware_without_key = PersonalizeMiddleware(Starlette(), metadata_refresh=None)
    for each in (middleware, middleware_without_key):
        caplog.clear()
        await each.startup()
        await each.shutdown()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, caplog.text
        text = warnings[0].getMessage()
        assert "LOCAL MODE" in text and sample_file_path() in text
        assert "report at /_personalize/report" in text


@pytest.mark.anyio
async def test_regression_an_unknown_key_in_local_mode_names_the_file_and_suggests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The log said the key "is unknown to the workspace" (there is none in local mode)
    and had no suggestion for home-hero."""
    middleware = build(routes={"/": ["home-hero"]}, metadata_refresh=300)
    assert middleware.metadata is not None
    await middleware.metadata.refresh()
    assert (
        f"configured experience key 'home-hero' is not in the local experiences file "
        f"{sample_file_path()}; did you mean 'hero-banner'?"
    ) in caplog.text


# -- the report -------------------------------------------------------------------------------


def test_report_with_moengage_needs_a_guard() -> None:
    assert "authorize(request)" in str(error_of(settings=SETTINGS, report=True))
    assert build(settings=SETTINGS, report=lambda request: True).report_path is not None
    assert build(settings=SETTINGS, report=False).report_path is None
    assert build(report=False).report_path is None  # local mode too
    assert build(report=True).report_path is not None  # local mode: no guard needed


@pytest.mark.anyio
async def test_the_guard_decides_who_sees_the_report() -> None:
    async def staff_only(request: Request) -> bool:
        return request.headers.get("x-staff") == "yes"

    def broken(request: Request) -> bool:
        raise RuntimeError("guard bug")

    for guard, headers, status in (
        (staff_only, {"x-staff": "yes"}, 200),
        (staff_only, {}, 403),
        (broken, {"x-staff": "yes"}, 403),
    ):
        middleware = build(backend=LocalBackend.default(), report=guard)
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/_personalize/report", headers=headers)
        assert response.status_code == status
        assert ("Homepage hero banner" in response.text) is (status == 200)


# -- the visitor cookie -----------------------------------------------------------------------


def anonymous(conn: HTTPConnection) -> Identity | None:
    return None


async def set_cookie(
    *,
    client: tuple[str, int] = ("203.0.113.9", 5000),
    scheme: str = "http",
    headers: dict[str, str] | None = None,
    **options: Any,
) -> str:
    app = Starlette(
        routes=[Route("/", page)],
        middleware=[
            Middleware(
                PersonalizeMiddleware,
                backend=FakeBackend(),
                routes={"/": ["hero"]},
                secret_key=SECRET,
                tracking=False,
                metadata_refresh=None,
                identify=anonymous,
                **options,
            )
        ],
    )
    # The peer address as the server would put it in the scope (no server rewrites here).
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url=f"{scheme}://shop.test") as c:
        response = await c.get("/", headers=headers or {})
    return response.headers["set-cookie"]


@pytest.mark.anyio
async def test_cookie_options_reach_the_header() -> None:
    cookie = await set_cookie(
        cookie=CookieOptions(name="vid", domain=".shop.test", path="/shop", same_site="strict")
    )
    assert cookie.startswith("vid=")
    parts = [part.strip() for part in cookie.split(";")]
    assert {"Path=/shop", "Domain=.shop.test", "HttpOnly", "SameSite=Strict"} <= set(parts)
    assert "Secure" not in parts


@pytest.mark.anyio
async def test_regression_behind_a_trusted_tls_proxy_the_cookie_is_secure() -> None:
    """Secure followed only the ASGI scheme: behind a TLS-terminating proxy (http to the
    app) the cookie went out without Secure."""
    proxy = ("10.0.0.5", 4000)
    forwarded = {"x-forwarded-proto": "https"}
    assert "Secure" in await set_cookie(
        client=proxy, headers=forwarded, trusted_proxies=["10.0.0.0/8"]
    )
    # Not from a trusted peer: the header is anyone's to send.
    assert "Secure" not in await set_cookie(client=("203.0.113.9", 1), headers=forwarded)
    assert "Secure" not in await set_cookie(
        client=("203.0.113.9", 1), headers=forwarded, trusted_proxies=["10.0.0.0/8"]
    )
    assert "Secure" not in await set_cookie(
        client=proxy, headers={"x-forwarded-proto": "http"}, trusted_proxies=["10.0.0.0/8"]
    )
    assert "Secure" in await set_cookie(scheme="https")  # the server's own scheme


@pytest.mark.anyio
async def test_https_only_and_same_site_none_force_the_secure_flag() -> None:
    assert "Secure" in await set_cookie(cookie=CookieOptions(https_only=True))
    assert "Secure" not in await set_cookie(scheme="https", cookie=CookieOptions(https_only=False))
    assert "Secure" in await set_cookie(cookie=CookieOptions(same_site="none"))
