"""The app ``tests/test_outbox_processes.py`` serves with uvicorn, one OS process each.

Configured by environment variables: ``PM_OB_BASE_URL`` (the stand-in MoEngage, ``.../v1``),
``PM_OB_OUTBOX`` (``events_outbox``: ``memory``, ``redis`` or a SQLite path),
``PM_OB_REDIS_URL``, ``PM_OB_WORKSPACE``, ``PM_OB_READ_TIMEOUT``, ``PM_OB_CLAIM_TIMEOUT``.
``create_app`` is the factory. The middleware builds its tracking and outbox from the
settings, as in production; only the batcher's pace is quickened. ``GET /`` answers the
page's tracking tokens (an impression and a click for each experience, as the template
hooks render them) for the visitor named by ``X-User``; ``GET /stats`` the batcher's
counters and the process id.
"""

from __future__ import annotations

import dataclasses
import os

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from personalize_middleware import (
    Identity,
    PersonalizeMiddleware,
    PersonalizeSettings,
    RetryPolicy,
    TrackingLimits,
    TrackingOptions,
)

KEYS = ("hero", "promo", "banner", "footer", "sidebar")
SIGNING_KEY = "outbox-process-test-signing-key-0123456789"
API_SECRET = "outbox-secret"


def identify(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


async def page(request: Request) -> JSONResponse:
    handle = request.state.personalize
    await handle.wait()
    tracking = handle.tracking
    tokens = [
        token
        for experience in handle.experiences.values()
        for b_id in (None, "Add to Cart")
        if (token := tracking.token_for(handle, experience, b_id)) is not None
    ]
    return JSONResponse(tokens)


async def stats(request: Request) -> JSONResponse:
    batcher = request.app.state.batcher
    return JSONResponse(
        {
            "pid": os.getpid(),
            "outbox": type(batcher.outbox).__name__,
            "pending": batcher.pending,
            **dataclasses.asdict(batcher.stats),
        }
    )


def create_app() -> PersonalizeMiddleware:
    """The app (``uvicorn --factory tests.support.outbox_app:create_app``)."""
    settings = PersonalizeSettings(
        workspace_id=os.environ["PM_OB_WORKSPACE"],
        api_secret=API_SECRET,
        base_url=os.environ["PM_OB_BASE_URL"],
        read_timeout=float(os.environ.get("PM_OB_READ_TIMEOUT", "5")),
        redis_url=os.environ.get("PM_OB_REDIS_URL") or None,
        events_outbox=os.environ.get("PM_OB_OUTBOX") or None,
    )
    inner = Starlette(routes=[Route("/", page), Route("/stats", stats)])
    middleware = PersonalizeMiddleware(
        inner,
        settings=settings,
        routes={"/": list(KEYS)},
        identify=identify,
        secret_key=SIGNING_KEY,
        metadata_refresh=None,
        latency_budget=5.0,  # every page personalized: these tests are about its events
        exclude_paths=["/stats"],
        # Beacons follow their page at once, and thousands come from one address: the
        # human-timing rules and rates are not what these tests are about.
        tracking=TrackingOptions(limits=TrackingLimits.off()),
    )
    assert middleware.tracking is not None
    batcher = inner.state.batcher = middleware.tracking.batcher
    batcher.flush_interval = 0.05
    batcher.policy = RetryPolicy(backoff_initial=0.05, backoff_max=0.5)
    if "PM_OB_CLAIM_TIMEOUT" in os.environ:
        batcher.outbox.claim_timeout = float(os.environ["PM_OB_CLAIM_TIMEOUT"])  # type: ignore[attr-defined]
    return middleware
