"""The example shop: every personalize-middleware feature in one small FastAPI app.

Run it with ``scripts/run-example`` (or ``uvicorn example_app.main:app``). Without
MoEngage credentials it runs on the embedded local experiences in
``example_app/experiences.yaml``; with ``MOENGAGE_WORKSPACE_ID`` and
``MOENGAGE_API_SECRET`` set (and ``MOENGAGE_BASE_URL`` when given) it asks MoEngage.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Form
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.templating import Jinja2Templates

from personalize_middleware import (
    ConfigurationError,
    Identity,
    Personalization,
    PersonalizeMiddleware,
    PersonalizeSettings,
    get_personalization,
    setup_templates,
)

#: The request's personalization, as a FastAPI dependency.
PersonalizationDep = Annotated[Personalization, Depends(get_personalization)]

HERE = Path(__file__).parent
EXPERIENCES_FILE = Path(os.environ.get("PERSONALIZE_LOCAL_FILE", HERE / "experiences.yaml"))

#: Per-route experience keys: fetched in ONE call as soon as the request arrives.
ROUTES: dict[str, list[str]] = {
    "/": ["home-hero", "winter-sale"],
    "/products/{product_id}": ["product-upsell"],
    "/landing": ["landing-hero"],
}
#: Keys every page gets (the sidebar is on every page).
SITE_KEYS = ["sidebar-promo"]

DEMO_CUSTOMERS = {
    "alice": "Alice (gold member)",
    "bob": "Bob (silver member)",
    "carol": "Carol (no tier)",
}
PRODUCTS = {
    "winter-jacket": {"name": "Winter jacket", "price": 129.0},
    "wool-hat": {"name": "Wool hat", "price": 24.0},
}


def create_app(
    settings: PersonalizeSettings | None = None,
    *,
    local_file: Path = EXPERIENCES_FILE,
    secret_key: str | None = None,
    latency_budget: float = 0.15,
) -> FastAPI:
    """The shop. ``settings`` None runs on ``local_file``, the embedded local experiences."""
    secret_key = secret_key or os.environ.get("PERSONALIZE_SECRET_KEY") or _dev_secret()
    app = FastAPI(title="personalize-middleware example shop", docs_url=None, redoc_url=None)
    templates = Jinja2Templates(directory=HERE / "templates")
    setup_templates(templates)  # the one line that makes experiences reach every template

    def base_context(request: Request) -> dict[str, object]:
        return {"customer_id": request.session.get("customer_id"), "customers": DEMO_CUSTOMERS}

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request) -> Response:
        return templates.TemplateResponse(request, "home.html", base_context(request))

    @app.get("/products/{product_id}", response_class=HTMLResponse)
    async def product(request: Request, product_id: str) -> Response:
        item = PRODUCTS.get(product_id)
        if item is None:
            return templates.TemplateResponse(
                request, "not_found.html", base_context(request), status_code=404
            )
        context = base_context(request) | {"product": item, "product_id": product_id}
        return templates.TemplateResponse(request, "product.html", context)

    @app.get("/landing", response_class=HTMLResponse)
    async def landing(request: Request) -> Response:
        return templates.TemplateResponse(request, "landing.html", base_context(request))

    @app.post("/login")
    async def login(
        request: Request,
        customer_id: Annotated[str, Form(max_length=64)],
        personalize: PersonalizationDep,
    ) -> Response:
        customer_id = customer_id.strip()
        if customer_id not in DEMO_CUSTOMERS:
            return templates.TemplateResponse(
                request,
                "home.html",
                base_context(request) | {"error": "Unknown demo customer"},
                status_code=400,
            )
        request.session["customer_id"] = customer_id
        # Drop what was cached for the anonymous visitor and for the customer.
        await personalize.invalidate(Identity(customer_id=customer_id))
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    async def logout(request: Request, personalize: PersonalizationDep) -> Response:
        await personalize.invalidate()
        request.session.pop("customer_id", None)
        return RedirectResponse("/", status_code=303)

    # Order matters: PersonalizeMiddleware is added first so that SessionMiddleware wraps
    # it and the session is known when the user is identified.
    app.add_middleware(
        PersonalizeMiddleware,
        settings=settings,
        local_experiences=None if settings else local_file,
        routes=ROUTES,
        site_keys=SITE_KEYS,
        secret_key=secret_key,
        latency_budget=latency_budget,
        exclude_paths=["/favicon.ico"],
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=os.environ.get("SESSION_SECRET_KEY") or secret_key,
        same_site="lax",
    )
    return app


_DEV_SECRET = secrets.token_hex(32)


def _dev_secret() -> str:
    """A per-process secret for the demo; production sets real ones in the environment."""
    return _DEV_SECRET


def settings_from_env() -> PersonalizeSettings | None:
    """Real MoEngage when credentials are in the environment, else None: local mode when
    no ``MOENGAGE_*`` variable is set; half of them set is reported by the middleware at
    start-up, in one line (raising here, at import time, would be a traceback)."""
    try:
        return PersonalizeSettings.from_env_if_configured()
    except ConfigurationError:
        return None


app = create_app(settings_from_env())
