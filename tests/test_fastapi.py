from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from personalize_middleware import (
    ConfigurationError,
    Experience,
    Identity,
    Personalization,
    PersonalizeMiddleware,
    get_personalization,
    require_experiences,
)
from tests.support.fake_backend import FakeBackend, variation_for


def identify(conn: HTTPConnection) -> Identity | None:
    user = conn.headers.get("x-test-user")
    return Identity(customer_id=user) if user else None


def make_app(backend: FakeBackend) -> FastAPI:
    app = FastAPI()

    @app.get("/products/{product_id}")
    async def product(
        product_id: int,
        personalize: Personalization = Depends(get_personalization),
        offers: dict[str, Experience] = Depends(require_experiences("cart-upsell", "upsell")),
    ) -> JSONResponse:
        await asyncio.sleep(0)  # the handler's own awaits overlap the early fetch
        return JSONResponse(
            {
                "id": product_id,
                "offers": {k: e.get("title") for k, e in offers.items()},
                "route": personalize.value("upsell", "title", "default"),
            }
        )

    app.add_middleware(
        PersonalizeMiddleware,
        backend=backend,
        routes={"/products/{product_id}": ["upsell"]},
        identify=identify,
        secret_key="fastapi-secret-0123456789",
        latency_budget=30.0,  # about correctness, not the budget: independent of load
        tracking=False,
        metadata_refresh=None,
    )
    return app


@pytest.mark.anyio
async def test_fastapi_dependency_fetches_only_missing_keys_in_one_call() -> None:
    backend = FakeBackend()
    app = make_app(backend)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/products/7", headers={"x-test-user": "zoe"})
    assert response.status_code == 200
    assert response.json() == {
        "id": 7,
        "offers": {
            "cart-upsell": variation_for("zoe", "cart-upsell"),
            "upsell": variation_for("zoe", "upsell"),
        },
        "route": variation_for("zoe", "upsell"),
    }
    # The route key went out at once; the dependency's extra key in one more call.
    assert [c["keys"] for c in backend.calls] == [["upsell"], ["cart-upsell"]]
    assert response.headers["cache-control"] == "private, no-store"


@pytest.mark.anyio
async def test_missing_middleware_is_a_clear_error() -> None:
    app = FastAPI()

    @app.get("/")
    async def home(personalize: Personalization = Depends(get_personalization)) -> None:
        return None

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with pytest.raises(ConfigurationError, match="add PersonalizeMiddleware"):
            await client.get("/")
