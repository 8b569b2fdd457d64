"""The apps every benchmark measures: the same page (``_pages.Page``), built different ways.

Every variant renders the same layout and the same blocks; what changes is what wraps the
page and where its values come from (``Kind``):

- ``plain``: no middleware, plain templates, the blocks show their defaults;
- ``floor``: the hand-written floor: no middleware; the handler looks the user up in a
  dict (by the visitor cookie) and signs the page view with one HMAC, rendering the
  user's values and the page-view token into the plain template;
- ``ignored``: ``PersonalizeMiddleware`` on (the page's experiences fetched, a cache hit)
  while the page reads nothing: the plain page with its defaults;
- ``direct``: the middleware, the page reading ``request.state.personalize`` itself;
- ``tag``: the middleware and ``setup_templates``: the ``{% experience %}`` tag per
  block, the page's hooks (an impression per block, clicks on its links) and the
  tracking script when it has hooks (``Page(3, 6)`` is the issue's full page);
- ``growthbook``: no middleware; per request a ``GrowthBook`` instance evaluating one
  JSON feature per block, then ``destroy()`` (GrowthBook's per-request pattern);
- ``growthbook_shared``: no middleware; ONE ``GrowthBookClient`` made at start-up and
  shared by every request, a ``UserContext`` per request (its documented async pattern).

``PRESETS`` names the variants the HTTP runs and the profiler take.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route

from personalize_middleware import (
    EventElement,
    Experience,
    ExperienceMetadata,
    Identity,
    PersonalizeBackend,
    PersonalizeMiddleware,
)
from personalize_middleware._identity import VisitorCookie
from personalize_middleware._signing import Keyring

from ._pages import (
    KEYS,
    LOADER,
    NAV,
    PERSONALIZED_TEMPLATES,
    PLAIN_TEMPLATES,
    PRODUCTS,
    Page,
    default_values,
)

__all__ = [
    "BROWSER_HEADERS",
    "FULL_PAGE",
    "KEYS",
    "PRESETS",
    "SECRET",
    "USER_AGENT",
    "InstantBackend",
    "Kind",
    "Page",
    "build_app",
    "experience_body",
    "header_identity",
    "preset_app",
    "visitor_cookie",
]

SECRET = "benchmark-secret-key-0123456789abcdef"
VISITOR_ID = "benchVisitor0000000001"  # the 22-character shape of a real visitor id
VISITOR_COOKIE = "pm_vid"
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
#: The issue's page: 3 experiences, 9 value reads, 3 impressions + 3 clicks, the script.
FULL_PAGE = Page(3, 6)

Kind = Literal["plain", "floor", "ignored", "direct", "tag", "growthbook", "growthbook_shared"]
_MIDDLEWARE_KINDS = frozenset({"ignored", "direct", "tag"})


def visitor_cookie(visitor_id: str = VISITOR_ID) -> str:
    """A ``Cookie`` header value carrying a validly signed visitor id (a returning visitor)."""
    signed = VisitorCookie(Keyring([SECRET])).set_cookie_header(visitor_id, secure=False)
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


def personal_values(keys: Iterable[str], who: str) -> dict[str, dict[str, Any]]:
    """The values ``experience_body`` carries, as the hand-written floor keeps them."""
    return {key: {"title": f"{key} for {who}", "cta": "Shop now", "discount": 15} for key in keys}


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


# -- the hand-written floor -------------------------------------------------------------------

FLOOR_KEY = hashlib.sha256(SECRET.encode()).digest()
FLOOR_USERS = 10_000  # users in the floor's dict besides the benchmark's visitor


class _FloorValues:
    """The hand-written floor's store: per visitor cookie, the user's values (a dict)."""

    def __init__(self, page: Page, visitors: Iterable[str] = ()) -> None:
        self.by_user: dict[str, dict[str, dict[str, Any]]] = {
            f"user-{i:06d}": personal_values(page.keys, f"user-{i:06d}") for i in range(FLOOR_USERS)
        }
        for visitor in (VISITOR_ID, *visitors):
            self.add(page, visitor)

    def add(self, page: Page, visitor_id: str) -> None:
        # Keyed by the raw cookie value: the floor does not verify the cookie's signature.
        raw = visitor_cookie(visitor_id).split(";", 1)[0].split("=", 1)[1]
        # What the middleware's upstream answers this visitor (the same values rendered).
        self.by_user[raw] = personal_values(page.keys, visitor_id)


def _page_view_token(user: str) -> str:
    render_id = secrets.token_urlsafe(12)
    mac = hmac.new(FLOOR_KEY, f"{user}.{render_id}".encode(), hashlib.sha256).hexdigest()
    return f"{render_id}.{mac}"


# -- GrowthBook ---------------------------------------------------------------------------------


def growthbook_features(page: Page) -> dict[str, Any]:
    """Per block one JSON feature (its 3 values): a targeting rule, then a 50/50 experiment
    on the user id whose variations are the defaults and a variant."""
    defaults = default_values(page.experiences)
    return {
        key: {
            "defaultValue": defaults[key],
            "rules": [
                {"condition": {"country": "ZZ"}, "force": {**defaults[key], "title": "ZZ"}},
                {
                    "key": f"{key}-test",
                    "variations": [defaults[key], {**defaults[key], "title": f"{key} variant"}],
                    "weights": [0.5, 0.5],
                    "coverage": 1.0,
                    "hashAttribute": "id",
                },
            ],
        }
        for key in page.keys
    }


def _growthbook_attributes(request: Request) -> dict[str, Any]:
    return {
        "id": request.cookies.get(VISITOR_COOKIE, "anonymous"),
        "country": "GB",
        "browser": "chrome",
        "url": str(request.url),
    }


class _Exposures:
    """Where an app would send GrowthBook's exposure events: counted here."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.count += 1


def _growthbook_per_request(
    page: Page,
) -> tuple[Callable[[Request], Awaitable[dict[str, Any]]], _Exposures]:
    from growthbook import GrowthBook

    features = growthbook_features(page)
    defaults = default_values(page.experiences)
    exposures = _Exposures()

    async def values(request: Request) -> dict[str, Any]:
        gb = GrowthBook(
            attributes=_growthbook_attributes(request),
            features=features,
            on_experiment_viewed=exposures,
        )
        try:
            return {key: gb.get_feature_value(key, defaults[key]) for key in page.keys}
        finally:
            gb.destroy()

    return values, exposures


class _SharedGrowthBook:
    """One ``GrowthBookClient`` for the app's life: features set at start-up (where an app
    would ``initialize()`` from the GrowthBook API), a ``UserContext`` per request."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.defaults = default_values(page.experiences)
        self.exposures = _Exposures()
        self.client: Any = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        from growthbook import GrowthBookClient, Options

        self.client = GrowthBookClient(Options(on_experiment_viewed=self.exposures))
        await self.client.set_features(growthbook_features(self.page))
        try:
            yield
        finally:
            await self.client.close()

    async def values(self, request: Request) -> dict[str, Any]:
        from growthbook import UserContext

        user = UserContext(attributes=_growthbook_attributes(request), url=str(request.url))
        get = self.client.get_feature_value
        return {key: await get(key, self.defaults[key], user) for key in self.page.keys}


# -- the app ------------------------------------------------------------------------------------

Fetcher = Callable[[str, Request], Awaitable[None]]


def build_app(
    kind: Kind,
    *,
    page: Page = FULL_PAGE,
    backend: PersonalizeBackend | None = None,
    handler_seconds: float = 0.0,
    naive_fetch: Fetcher | None = None,
    floor_visitors: Iterable[str] = (),
    **options: Any,
) -> Starlette:
    """The page app. ``handler_seconds``: the handler's own await (a database call, say).
    ``naive_fetch``: awaited once per key after the handler's work, before rendering (the
    naive integration the early fetch is compared with). ``floor_visitors``: more visitor
    ids the hand-written floor knows. ``options`` go to the middleware."""
    defaults = default_values(page.experiences)
    base: dict[str, Any] = {"title": "Home", "nav": NAV, "products": PRODUCTS}
    lifespan = None
    values: Callable[[Request], Awaitable[dict[str, Any]]] | None = None
    floor: _FloorValues | None = None
    exposures: _Exposures | None = None
    if kind == "floor":
        floor = _FloorValues(page, floor_visitors)
    elif kind == "growthbook":
        values, exposures = _growthbook_per_request(page)
    elif kind == "growthbook_shared":
        shared = _SharedGrowthBook(page)
        values, lifespan, exposures = shared.values, shared.lifespan, shared.exposures

    async def home(request: Request) -> Response:
        if handler_seconds:
            await asyncio.sleep(handler_seconds)
        if naive_fetch is not None:
            for key in page.keys:
                await naive_fetch(key, request)
        context = dict(base)  # a fresh dict: TemplateResponse adds the request to it
        if kind == "tag":
            return PERSONALIZED_TEMPLATES.TemplateResponse(request, page.tag_name, context)
        if kind == "direct":
            await request.state.personalize.wait()  # within the latency budget
            return PLAIN_TEMPLATES.TemplateResponse(request, page.direct_name, context)
        if floor is not None:
            user = request.cookies.get(VISITOR_COOKIE, "")
            context["values"] = floor.by_user.get(user, defaults)  # one dict lookup
            context["page_token"] = _page_view_token(user)  # one HMAC
        elif values is not None:
            context["values"] = await values(request)
        else:
            context["values"] = defaults
        return PLAIN_TEMPLATES.TemplateResponse(request, page.plain_name, context)

    LOADER.add(page)
    middleware: list[Middleware] = []
    if kind in _MIDDLEWARE_KINDS:
        options.setdefault("routes", {"/": list(page.keys)})
        options.setdefault("secret_key", SECRET)
        options.setdefault("metadata_refresh", None)
        # One load generator stands for every user: the per-client fetch limits (an
        # abuse guard, off the hit path) would shed its cold misses after a burst.
        options.setdefault("client_limits", None)
        if backend is None and "settings" not in options:
            backend = InstantBackend()
        middleware.append(Middleware(PersonalizeMiddleware, backend=backend, **options))
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/beacon", plain_beacon, methods=["POST"]),
            Route("/_fill", fill),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    app.state.exposures = exposures
    return app


async def fill(request: Request) -> Response:
    """Waits for the request's experiences, renders nothing: fills the cache cheaply (give
    the middleware ``routes={"/": keys, "/_fill": keys}``)."""
    handle = request.scope.get("state", {}).get("personalize")
    if handle is not None:
        await handle.wait()
    return Response(status_code=204)


async def plain_beacon(request: Request) -> Response:
    """The baseline for the events endpoint: a plain Starlette endpoint that reads and
    parses the same JSON body and answers 204, doing nothing with it."""
    json.loads(await request.body())
    return Response(status_code=204)


#: Named variants, for the HTTP runs and the profiler.
PRESETS: dict[str, tuple[Kind, Page]] = {
    "plain": ("plain", FULL_PAGE),
    "floor": ("floor", FULL_PAGE),
    "ignored": ("ignored", FULL_PAGE),
    "direct": ("direct", FULL_PAGE),
    "tag": ("tag", Page(3, 0)),
    "full": ("tag", FULL_PAGE),
    "growthbook": ("growthbook", FULL_PAGE),
    "growthbook_shared": ("growthbook_shared", FULL_PAGE),
}


def preset_app(name: str) -> Starlette:
    kind, page = PRESETS[name]
    return build_app(kind, page=page)
