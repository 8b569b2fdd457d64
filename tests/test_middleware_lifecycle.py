"""The middleware's lifecycle (one state, start-up that cleans up after itself) and two
bugs found reading the layout: the report with the HTTP client, the Tracking's prefix."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from personalize_middleware import (
    ConfigurationError,
    Identity,
    Keyring,
    Lifecycle,
    PersonalizeMiddleware,
    PersonalizeSettings,
    Tracking,
    TrackingLimits,
)
from tests.support.faulty_upstream import FaultyUpstream, wait_until
from tests.support.tracking_helpers import BROWSER_USER_AGENT, StaticBackend

WORKSPACE = "WS_LIFECYCLE"
SECRET = "lifecycle-suite-api-secret-0001"
SIGNING_KEY = "lifecycle-suite-signing-key-0123456"
KEYS = ("hero",)
BROWSER = {"user-agent": BROWSER_USER_AGENT}  # httpx's own is on the crawler list

pytestmark = pytest.mark.anyio


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


async def tokens_page(request: Request) -> Response:
    """The impression token of every experience of the page, as the hooks would render."""
    handle = request.state.personalize
    await handle.wait()
    tracking = handle.tracking
    return JSONResponse(
        [tracking.token_for(handle, e) for e in handle.experiences.values()]
        if tracking is not None
        else []
    )


async def plain(request: Request) -> Response:
    return PlainTextResponse("ok")


# -- lifecycle ------------------------------------------------------------------------------


async def test_a_start_up_failing_half_way_closes_what_it_opened() -> None:
    middleware = PersonalizeMiddleware(
        Starlette(routes=[Route("/", plain)]),
        backend=StaticBackend({"hero": {"Title": "Hi"}}),
        secret_key=SIGNING_KEY,
        metadata_refresh=60,
    )
    assert middleware.tracking is not None and middleware.metadata is not None
    batcher = middleware.tracking.batcher

    def broken_start() -> None:
        raise RuntimeError("metadata watcher could not start")

    middleware.metadata.start = broken_start  # type: ignore[method-assign]
    assert middleware.state is Lifecycle.NEW
    with pytest.raises(RuntimeError, match="could not start"):
        await middleware.startup()
    # The batcher had started before the watcher failed: it was closed again.
    assert batcher.state is Lifecycle.CLOSED
    assert middleware.state is Lifecycle.NEW

    del middleware.metadata.start  # the real one again: start-up can be retried
    await middleware.startup()
    assert middleware.state is Lifecycle.RUNNING and batcher.state is Lifecycle.RUNNING
    await middleware.shutdown()
    assert middleware.state is Lifecycle.CLOSED and batcher.state is Lifecycle.CLOSED


async def test_shutdown_closes_in_reverse_order_of_start_up() -> None:
    order: list[str] = []
    backend = StaticBackend({})
    middleware = PersonalizeMiddleware(
        Starlette(routes=[Route("/", plain)]),
        backend=backend,
        secret_key=SIGNING_KEY,
        metadata_refresh=60,
    )
    assert middleware.tracking is not None and middleware.metadata is not None
    for name, component in (
        ("store", middleware.store),
        ("tracking", middleware.tracking),
        ("metadata", middleware.metadata),
    ):
        original = component.aclose

        async def aclose(*args: Any, _name: str = name, _original: Any = original) -> None:
            order.append(_name)
            await _original(*args)

        component.aclose = aclose  # type: ignore[method-assign]
    await middleware.startup()
    await middleware.shutdown()
    assert order == ["metadata", "tracking", "store"]


# -- regression: the report answered 500 with the HTTP client ---------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultyUpstream]:
    stand_in = FaultyUpstream(workspace_id=WORKSPACE, api_secret=SECRET, known_keys=KEYS)
    with stand_in.serve():
        yield stand_in


def _site(upstream: FaultyUpstream, **options: Any) -> PersonalizeMiddleware:
    return PersonalizeMiddleware(
        Starlette(routes=[Route("/", tokens_page)]),
        settings=PersonalizeSettings(
            workspace_id=WORKSPACE, api_secret=SECRET, base_url=upstream.base_url
        ),
        routes={"/": list(KEYS)},
        identify=header_identity,
        secret_key=SIGNING_KEY,
        metadata_refresh=None,
        latency_budget=5.0,
        **options,
    )


async def test_regression_report_with_the_http_client_counts_what_this_process_tracked(
    upstream: FaultyUpstream,
) -> None:
    upstream.reset()
    middleware = _site(upstream, report=lambda request: True)
    assert middleware.tracking is not None
    middleware.tracking.limits = TrackingLimits.off()  # the beacon follows its page at once
    await middleware.startup()
    try:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://shop.test", headers=BROWSER
        ) as client:
            empty = await client.get("/_personalize/report/report.json")
            assert empty.status_code == 200, empty.text  # was a 500
            assert empty.json()["events_recorded"] == 0
            tokens = (await client.get("/", headers={"x-user": "alice"})).json()
            assert len(tokens) == 1
            beacon = await client.post(
                "/_personalize/events",
                json={"events": tokens},
                headers={"x-user": "alice", "origin": "http://shop.test"},
            )
            assert beacon.status_code == 204
            assert middleware.tracking is not None
            await middleware.tracking.batcher.flush()
            await wait_until(lambda: len(upstream.accepted_uuids) == 1, message="delivery")
            report = (await client.get("/_personalize/report/report.json")).json()
            assert report["events_recorded"] == 1
            page = await client.get("/_personalize/report")
            assert page.status_code == 200 and "hero" in page.text
    finally:
        await middleware.shutdown()


async def test_report_stays_off_with_the_http_client_unless_asked(
    upstream: FaultyUpstream,
) -> None:
    middleware = _site(upstream)
    assert middleware.report_path is None


# -- regression: a Tracking object's own prefix answered 404 ----------------------------------


async def test_regression_a_tracking_object_with_its_own_prefix_is_routed() -> None:
    keyring = Keyring.from_config(SIGNING_KEY)
    backend = StaticBackend({"hero": {"Title": "Hi"}})
    tracking = Tracking(
        keyring=keyring, backend=backend, prefix="/track", limits=TrackingLimits.off()
    )
    middleware = PersonalizeMiddleware(
        Starlette(routes=[Route("/", tokens_page)]),
        backend=backend,
        routes={"/": ["hero"]},
        identify=header_identity,
        secret_key=SIGNING_KEY,
        tracking=tracking,
        metadata_refresh=None,
        latency_budget=5.0,
    )
    assert middleware.tracking_prefix == "/track"
    await middleware.startup()
    try:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://shop.test", headers=BROWSER
        ) as client:
            script = await client.get(tracking.script_path)
            assert script.status_code == 200  # was a 404
            assert script.headers["content-type"].startswith("text/javascript")
            tokens = (await client.get("/", headers={"x-user": "bob"})).json()
            beacon = await client.post(
                tracking.events_path,
                json={"events": tokens},
                headers={"x-user": "bob", "origin": "http://shop.test"},
            )
            assert beacon.status_code == 204  # was a 404
            assert tracking.stats.accepted == 1
            assert (await client.get("/_personalize/events")).status_code == 404
    finally:
        await middleware.shutdown()


async def test_two_different_prefixes_are_a_configuration_error() -> None:
    backend = StaticBackend({})
    tracking = Tracking(keyring=Keyring.from_config(SIGNING_KEY), backend=backend, prefix="/t")
    middleware = PersonalizeMiddleware(
        Starlette(),
        backend=backend,
        secret_key=SIGNING_KEY,
        tracking=tracking,
        tracking_prefix="/other",
    )
    with pytest.raises(ConfigurationError, match="Tracking") as caught:
        await middleware.startup()
    assert caught.value.field == "tracking_prefix"
