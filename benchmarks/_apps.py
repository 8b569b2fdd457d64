"""The apps every benchmark measures: one template page, with and without the middleware.

The page is the same Starlette ``Jinja2Templates`` page (the same layout and markup) in
every variant; what changes is what wraps it and how its three blocks get their text:

- ``baseline``: no middleware, plain templates, the blocks show their defaults;
- ``personalized``: ``PersonalizeMiddleware`` (3 experiences on ``/``, tracking on) and
  the Jinja helpers (``setup_templates``): the ``{% experience %}`` tag, an impression
  hook per block, a click hook per call to action, the tracking script;
- ``tag``: the middleware and the tag, without the tracking hooks and script;
- ``direct``: the middleware, the page reading ``request.state.personalize`` directly;
- ``growthbook``: no middleware, the handler evaluates 3 GrowthBook features locally
  (GrowthBook's documented per-request pattern: an instance per request, then ``destroy``).

``baseline_app`` and ``personalized_app`` are also uvicorn factories for the HTTP runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from personalize_middleware import (
    EventElement,
    Experience,
    ExperienceMetadata,
    Identity,
    PersonalizeBackend,
    PersonalizeMiddleware,
    setup_templates,
)
from personalize_middleware._identity import VisitorCookie
from personalize_middleware._signing import Keyring

__all__ = [
    "BROWSER_HEADERS",
    "KEYS",
    "SECRET",
    "InstantBackend",
    "Variant",
    "baseline_app",
    "build_app",
    "direct_app",
    "experience_body",
    "growthbook_app",
    "header_identity",
    "personalized_app",
    "visitor_cookie",
]

SECRET = "benchmark-secret-key-0123456789abcdef"
KEYS: tuple[str, ...] = ("home-hero", "home-promo", "home-sidebar")
DEFAULTS = {"home-hero": "Welcome", "home-promo": "Free shipping", "home-sidebar": "New in"}
VISITOR_ID = "benchVisitor0000000001"  # the 22-character shape of a real visitor id
NAV = [{"href": f"/c/{i}", "label": f"Category {i}"} for i in range(6)]
PRODUCTS = [{"id": i, "name": f"Product {i}", "price": f"{9 + i}.99"} for i in range(8)]
USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
BROWSER_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"host", b"shop.example"),
    (b"user-agent", USER_AGENT.encode()),
    (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"accept-language", b"en-GB,en;q=0.9"),
    (b"accept-encoding", b"gzip, deflate, br"),
)

Variant = Literal["baseline", "personalized", "tag", "direct", "growthbook"]


def visitor_cookie() -> str:
    """A ``Cookie`` header value carrying a validly signed visitor id (a returning visitor)."""
    signed = VisitorCookie(Keyring([SECRET])).set_cookie_header(VISITOR_ID, secure=False)
    return signed.decode("latin-1").split(";", 1)[0] + "; theme=dark; _ga=GA1.2.1234.5678"


def experience_body(keys: Iterable[str], who: str) -> bytes:
    """What the Fetch Experience API answers for ``keys``: a realistic JSON body."""
    return json.dumps(
        {
            "experiences": {
                key: {
                    "payload": {
                        "title": {"value": f"{key} for {who}", "data_type": "string"},
                        "cta": {"value": "Shop now", "data_type": "string"},
                        "discount": {"value": "15", "data_type": "number"},
                    },
                    "experience_context": {
                        "cid": f"66a1b2c3d4e5f6{i:04d}_F_T_WP_AB_1_P_0_L_0",
                        "experience": key,
                        "moe_variation_id": "2",
                        "audience_name": "All Users",
                        "audience_id": "66a1b2c3d4e5f60000000001",
                        "moe_locale_id": "0",
                        "type": "personalization",
                        "experience_type": "web_personalization",
                    },
                }
                for i, key in enumerate(keys)
            }
        }
    ).encode()


class InstantBackend:
    """An in-process backend: answers after ``delay`` seconds (``asyncio.sleep``), parsing
    a real JSON answer each call as the HTTP client would. Counts its calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0
        self.events: list[EventElement] = []
        self.event_calls = 0

    async def fetch_experiences(
        self,
        keys: Iterable[str],
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Experience]:
        self.calls += 1
        keys = list(keys)
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = json.loads(experience_body(keys, customer_id or "someone"))
        return {k: Experience.from_api(k, v) for k, v in answer["experiences"].items()}

    async def fetch_metadata(
        self, statuses: Iterable[str] | None = None
    ) -> list[ExperienceMetadata]:
        return []

    async def track_events(self, elements: Sequence[EventElement]) -> None:
        self.event_calls += 1
        self.events.extend(elements)

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def header_identity(conn: HTTPConnection) -> Identity | None:
    """Benchmark-only resolver: the user named by ``x-bench-user`` (unsigned, so never
    do this in an app; it lets the cold-miss runs choose cold and shared users)."""
    user = conn.headers.get("x-bench-user")
    return Identity(customer_id=user) if user else None


# GrowthBook features: per feature, a targeting rule and a 50/50 experiment on the user id.
GROWTHBOOK_FEATURES: dict[str, Any] = {
    key: {
        "defaultValue": DEFAULTS[key],
        "rules": [
            {"condition": {"country": "ZZ"}, "force": f"{key} for ZZ"},
            {
                "key": f"{key}-test",
                "variations": [DEFAULTS[key], f"{key} variant"],
                "weights": [0.5, 0.5],
                "coverage": 1.0,
                "hashAttribute": "id",
            },
        ],
    }
    for key in KEYS
}


def _growthbook_flags(request: Request) -> dict[str, str]:
    from growthbook import GrowthBook

    viewed: list[Any] = []

    def on_viewed(experiment: Any, result: Any, *args: Any, **kwargs: Any) -> None:
        viewed.append(result)  # where an app would send its exposure event

    gb = GrowthBook(
        attributes={
            "id": request.cookies.get("pm_vid", "anonymous"),
            "country": "GB",
            "browser": "chrome",
            "url": str(request.url),
        },
        features=GROWTHBOOK_FEATURES,
        on_experiment_viewed=on_viewed,
    )
    try:
        return {key: gb.get_feature_value(key, DEFAULTS[key]) for key in KEYS}
    finally:
        gb.destroy()


Fetcher = Callable[[str, Request], Awaitable[None]]

_TEMPLATE_DIR = str(Path(__file__).with_name("templates"))
#: What the app had before personalization: plain Starlette templates.
PLAIN_TEMPLATES = Jinja2Templates(directory=_TEMPLATE_DIR)
#: The same directory with ``setup_templates``: the tag, the hooks, the waiting response.
PERSONALIZED_TEMPLATES = Jinja2Templates(directory=_TEMPLATE_DIR)
setup_templates(PERSONALIZED_TEMPLATES)

_PAGES: dict[str, tuple[Jinja2Templates, str]] = {
    "baseline": (PLAIN_TEMPLATES, "plain.html"),
    "growthbook": (PLAIN_TEMPLATES, "plain.html"),
    "personalized": (PERSONALIZED_TEMPLATES, "page.html"),
    "tag": (PERSONALIZED_TEMPLATES, "tag.html"),
    "direct": (PLAIN_TEMPLATES, "direct.html"),
}


def build_app(
    variant: Variant,
    *,
    backend: PersonalizeBackend | None = None,
    handler_seconds: float = 0.0,
    naive_fetch: Fetcher | None = None,
    **options: Any,
) -> Starlette:
    """The page app. ``handler_seconds``: the handler's own await (a database call, say).
    ``naive_fetch``: awaited once per key after the handler's work, before rendering (the
    naive integration the early fetch is compared with)."""
    templates, template = _PAGES[variant]

    async def home(request: Request) -> Response:
        if handler_seconds:
            await asyncio.sleep(handler_seconds)
        if naive_fetch is not None:
            for key in KEYS:
                await naive_fetch(key, request)
        if variant == "direct":
            await request.state.personalize.wait()  # within the latency budget
        titles = _growthbook_flags(request) if variant == "growthbook" else DEFAULTS
        return templates.TemplateResponse(
            request,
            template,
            {
                "title": "Home",
                "nav": NAV,
                "products": PRODUCTS,
                "blocks": list(DEFAULTS.items()),
                "titles": titles,
            },
        )

    middleware: list[Middleware] = []
    if variant in ("personalized", "tag", "direct"):
        options.setdefault("routes", {"/": list(KEYS)})
        options.setdefault("secret_key", SECRET)
        options.setdefault("metadata_refresh", None)
        if backend is None and "settings" not in options:
            backend = InstantBackend()
        middleware.append(Middleware(PersonalizeMiddleware, backend=backend, **options))
    return Starlette(
        routes=[Route("/", home), Route("/beacon", plain_beacon, methods=["POST"])],
        middleware=middleware,
    )


async def plain_beacon(request: Request) -> Response:
    """The baseline for the events endpoint: a plain Starlette endpoint that reads and
    parses the same JSON body and answers 204, doing nothing with it."""
    json.loads(await request.body())
    return Response(status_code=204)


def baseline_app() -> Starlette:
    """uvicorn factory: the page without the middleware."""
    return build_app("baseline")


def personalized_app() -> Starlette:
    """uvicorn factory: the page with the middleware on an in-process backend."""
    return build_app("personalized", backend=InstantBackend())


def growthbook_app() -> Starlette:
    """uvicorn factory: the page evaluating 3 GrowthBook features."""
    return build_app("growthbook")


def direct_app() -> Starlette:
    """uvicorn factory: the middleware, the page reading the handle directly."""
    return build_app("direct", backend=InstantBackend())
