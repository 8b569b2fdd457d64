"""The app ``tests/test_redis_e2e.py`` serves with ``uvicorn --workers 4``.

Configured by environment variables (each worker process imports this module):
``PM_E2E_BASE_URL`` (the stand-in MoEngage), ``PM_E2E_REDIS_URL``, ``PM_E2E_WORKSPACE``.
The layer is built from ``settings.redis_url`` exactly as the middleware does it, but here,
so ``/healthz`` can report its counters. The user is named by an ``X-User`` header; every
page says which process served it.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from personalize_middleware import (
    Identity,
    PersonalizeMiddleware,
    PersonalizeSettings,
    RedisSharedLayer,
)


def identify(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


async def home(request: Request) -> JSONResponse:
    personalization = request.state.personalize
    await personalization.wait()
    title = personalization.value("hero", "title", "default title")
    return JSONResponse({"pid": os.getpid(), "title": title})


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "redis": layer.stats.as_dict()})


settings = PersonalizeSettings(
    workspace_id=os.environ["PM_E2E_WORKSPACE"],
    api_secret="e2e-secret",
    base_url=os.environ["PM_E2E_BASE_URL"],
    redis_url=os.environ["PM_E2E_REDIS_URL"],
)
# What the middleware builds itself from settings.redis_url, made here to read its stats.
layer = RedisSharedLayer.from_settings(settings)
app = Starlette(routes=[Route("/", home), Route("/healthz", healthz)])
app.add_middleware(
    PersonalizeMiddleware,
    settings=settings,
    routes={"/": ["hero"]},
    identify=identify,
    latency_budget=5.0,  # pages wait for the fetch: the test checks what they show
    send_time_of_day=False,  # one context for the whole test, even across an hour
    tracking=False,
    metadata_refresh=None,
    exclude_paths=["/healthz"],
    shared=layer,
)
