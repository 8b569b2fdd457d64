"""The app one gunicorn worker serves in the multiprocess Prometheus test
(``gunicorn tests.support.prometheus_app:app``): personalized pages that name the worker
(``pid``), ``/healthz``, and ``/metrics`` scraped from every worker's files.

Configured from the environment the test sets: ``PROM_TEST_UPSTREAM`` (the stand-in's
base URL), ``PROM_TEST_WORKSPACE``, ``PROM_TEST_SECRET``; ``PROMETHEUS_MULTIPROC_DIR`` is
set before the workers start, so ``prometheus_client`` runs in multiprocess mode.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from personalize_middleware import (
    Identity,
    PersonalizeMiddleware,
    PersonalizeSettings,
    PrometheusMetrics,
)

KEYS = ("hero", "promo")


def header_identity(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-user")
    return Identity(customer_id=user) if user else None


async def page(request: Request) -> Response:
    handle = request.state.personalize
    await handle.wait()
    titles = {key: handle.value(key, "title", "default") for key in KEYS}
    return JSONResponse({"pid": os.getpid(), "titles": titles})


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


metrics = PrometheusMetrics()
site = PersonalizeMiddleware(
    Starlette(routes=[Route("/", page), Route("/healthz", healthz)]),
    settings=PersonalizeSettings(
        workspace_id=os.environ["PROM_TEST_WORKSPACE"],
        api_secret=os.environ["PROM_TEST_SECRET"],
        base_url=os.environ["PROM_TEST_UPSTREAM"],
    ),
    routes={"/": list(KEYS)},
    identify=header_identity,
    secret_key="prometheus-gunicorn-signing-key-0123456789",
    metadata_refresh=None,
    latency_budget=2.0,  # the test counts fresh answers: a loaded CI box must not time out
    exclude_paths=("/healthz",),
    telemetry=metrics,
)
metrics_app = metrics.asgi_app()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http" and scope["path"] == "/metrics":
        await metrics_app(scope, receive, send)
    else:
        await site(scope, receive, send)
