"""The app the fleet tests serve with several worker processes (``gunicorn --preload`` or
``uvicorn --workers``).

The middleware wraps the app explicitly, so it is built when this module is imported:
under ``gunicorn --preload`` that is in the master, before the fork. Configured by
environment variables:

``PM_FLEET_BASE_URL``          the stand-in MoEngage (``.../v1`` or its root)
``PM_FLEET_WORKSPACE``         the workspace id (also the Redis namespace's hash tag)
``PM_FLEET_REDIS_URL``         optional: the shared layer
``PM_FLEET_METADATA_REFRESH``  optional: seconds between metadata refreshes (default off)
``PM_FLEET_TRACKING``          "1": server-side impressions, delivered by the batcher
``PM_FLEET_WARMUP``            "1": start the middleware and fetch once at import, on an
                               event loop of the master's own, and leave it all running, as
                               a preloaded app warming up would (what must not cross a fork)

``GET /`` (user in ``X-User``) answers its pid and the titles it rendered;
``GET /healthz`` the pid and counters; ``POST /_test/refresh-metadata`` makes this process
refresh its metadata now, as its own periodic refresh would.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from personalize_middleware import Identity, PersonalizeMiddleware, PersonalizeSettings
from personalize_middleware._models import FetchQuery

KEYS = ["hero", "banner"]


def identify(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


async def home(request: Request) -> JSONResponse:
    handle = request.state.personalize
    await handle.wait()
    titles: dict[str, Any] = {}
    for key in KEYS:
        experience = handle.experience(key)
        titles[key] = experience.get("title") if experience is not None else None
        if experience is not None and middleware.tracking is not None:
            middleware.tracking.impression_attrs(handle, experience)  # recorded server-side
    return JSONResponse({"pid": os.getpid(), "titles": titles})


async def healthz(request: Request) -> JSONResponse:
    tracking = middleware.tracking
    shared: Any = middleware.store.shared
    return JSONResponse(
        {
            "pid": os.getpid(),
            "state": middleware.state.value,
            "upstream_calls": middleware.store.stats.upstream_calls,
            "events_sent": tracking.batcher.stats.sent if tracking is not None else 0,
            "broadcasts_received": getattr(getattr(shared, "broadcast", None), "received", 0),
        }
    )


async def refresh_metadata(request: Request) -> JSONResponse:
    assert middleware.metadata is not None
    await middleware.metadata.refresh()
    return JSONResponse({"pid": os.getpid()})


env = os.environ
settings = PersonalizeSettings(
    workspace_id=env["PM_FLEET_WORKSPACE"],
    api_secret=env.get("PM_FLEET_API_SECRET", "fleet-secret"),
    base_url=env["PM_FLEET_BASE_URL"],
    redis_url=env.get("PM_FLEET_REDIS_URL") or None,
)
refresh = env.get("PM_FLEET_METADATA_REFRESH")
tracking = env.get("PM_FLEET_TRACKING") == "1"
inner = Starlette(
    routes=[
        Route("/", home),
        Route("/healthz", healthz),
        Route("/_test/refresh-metadata", refresh_metadata, methods=["POST"]),
    ]
)
middleware = PersonalizeMiddleware(
    inner,
    settings=settings,
    routes={"/": KEYS},
    identify=identify,
    secret_key="fleet-test-secret-key-0123456789abcdef",
    latency_budget=5.0,  # pages wait for the fetch: the tests check what they show
    send_time_of_day=False,
    send_day_of_week=False,
    send_user_agent=False,
    send_ip_address=False,
    tracking=tracking,
    impressions="server",
    metadata_refresh=float(refresh) if refresh else None,
    exclude_paths=["/healthz", "/_test"],
    client_limits=None,  # one customer's pages, hundreds a second: not what is tested here
)
app = middleware


async def _warm_up() -> None:
    await middleware.startup()
    query = FetchQuery(Identity(customer_id="warm-up"), {})
    await middleware.store.get(query, KEYS, timeout=5.0)


if env.get("PM_FLEET_WARMUP") == "1":
    asyncio.run(_warm_up())
