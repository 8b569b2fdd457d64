"""Helpers for the tracking tests: experiences, an in-process backend and a MoEngage
stand-in over real HTTP that validates every call against the spec and records events.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from personalize_middleware import (
    EventElement,
    Experience,
    ExperienceMetadata,
    ExperienceStore,
    Identity,
    Keyring,
    Personalization,
)
from personalize_middleware.tracking import Tracking, TrackingToken
from personalize_middleware.tracking._pages import decode_events
from tests.support.spec import SpecViolation, validate_request_parts

WORKSPACE_ID = "TESTWORKSPACE01"
API_SECRET = "stand-in-secret-0123456789"
#: A person's browser (desktop Chrome): httpx's own user agent is on the crawler list.
BROWSER_USER_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
GOOGLEBOT_USER_AGENT = (
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; "
    "+http://www.google.com/bot.html) Chrome/131.0.6778.204 Safari/537.36"
)


class FakeClock:
    """A wall clock a test moves by hand (``Tracking(clock=...)``): "the visitor looked
    at the page for 1.5 s" without the test waiting 1.5 s."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def context_for(key: str, variation: str = "2") -> dict[str, str]:
    """A spec-valid ``experience_context`` for ``key``."""
    return {
        "cid": f"66d55ae445921e4d35ae4368_{key}",
        "experience": f"Experience {key}",
        "moe_locale_id": "0",
        "moe_variation_id": variation,
        "audience_name": "All Users",
        "audience_id": "5A",
        "type": "Web Personalization",
    }


def api_experience(key: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The wire shape of one experience; ``payload`` maps names to values (strings) or to
    ``(value, data_type)`` pairs."""
    variables = {}
    for name, value in payload.items():
        if isinstance(value, tuple):
            variables[name] = {"value": value[0], "data_type": value[1]}
        else:
            variables[name] = {"value": value, "data_type": "string"}
    return {"payload": variables, "experience_context": context_for(key)}


class StaticBackend:
    """Answers the configured experiences to everyone; records tracked elements."""

    def __init__(self, experiences: Mapping[str, Mapping[str, Any]]) -> None:
        self.experiences = {k: api_experience(k, v) for k, v in experiences.items()}
        self.events: list[EventElement] = []
        self.fetches: list[list[str]] = []

    async def fetch_experiences(
        self,
        keys: Iterable[str],
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Experience]:
        keys = list(keys)
        self.fetches.append(keys)
        return {
            k: Experience.from_api(k, self.experiences[k]) for k in keys if k in self.experiences
        }

    async def fetch_metadata(
        self, statuses: Iterable[str] | None = None
    ) -> list[ExperienceMetadata]:
        return []

    async def track_events(self, elements: Sequence[EventElement]) -> None:
        self.events.extend(elements)

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass


@dataclass(frozen=True)
class Delay:
    """A plan's answer: wait ``seconds`` (without blocking the server), then answer ``then``
    (``None``: accept, as a slow but healthy API does)."""

    seconds: float
    then: Response | None = None


# A plan decides the answer to one events call: None = record and answer 200.
Plan = Callable[[int, dict[str, Any]], "Response | Delay | None"]


class EventsStandIn:
    """A MoEngage stand-in (runs on the uvicorn thread; talk to it from the test thread).

    ``fetch`` answers ``experiences``; ``events`` validates the call against the spec,
    asks ``plan(call_number, body)`` for a non-200 answer, else records the body.
    ``delivered`` lists every accepted action with its ``customer_id``.
    """

    def __init__(
        self,
        experiences: Mapping[str, Mapping[str, Any]] | None = None,
        plan: Plan | None = None,
    ) -> None:
        self.experiences = {k: api_experience(k, v) for k, v in (experiences or {}).items()}
        self.plan = plan
        self._lock = threading.Condition()
        self.calls: list[tuple[float, dict[str, Any], int]] = []  # (time, body, status)
        self.accepted_bodies: list[dict[str, Any]] = []
        self._violations: list[str] = []
        self._unchecked: list[tuple[str, str, dict[str, str], bytes]] = []

    # -- reading (test thread) ---------------------------------------------------------------

    @property
    def violations(self) -> list[str]:
        """Spec violations of the calls so far. Validation (~0.1 s for a large events
        body) runs here, on the reader's thread, not while the stand-in answers: it must
        not slow the answers past a client's timeout."""
        with self._lock:
            unchecked, self._unchecked = self._unchecked, []
        found = []
        for method, url, headers, body in unchecked:
            try:
                validate_request_parts(
                    method, url, headers, body, workspace_id=WORKSPACE_ID, api_secret=API_SECRET
                )
            except SpecViolation as exc:
                found.append(str(exc))
        with self._lock:
            self._violations.extend(found)
            return list(self._violations)

    @property
    def delivered(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {**action, "customer_id": element["customer_id"]}
                for body in self.accepted_bodies
                for element in body["elements"]
                for action in element["actions"]
            ]

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0
    ) -> bool:
        """Wait until ``predicate(delivered)`` holds (re-checked on every call)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if predicate(self.delivered):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)

    def attempted_uuids(self) -> list[str]:
        with self._lock:
            return [
                action["moe_event_uuid"]
                for _, body, _ in self.calls
                for element in body.get("elements", [])
                for action in element.get("actions", [])
            ]

    # -- the app -----------------------------------------------------------------------------

    def app(self) -> Starlette:
        async def fetch(request: Request) -> Response:
            body = await request.body()
            self._validate(request, body)
            keys = json.loads(body).get("experience_key") or list(self.experiences)
            found = {k: self.experiences[k] for k in keys if k in self.experiences}
            return JSONResponse({"experiences": found})

        async def events(request: Request) -> Response:
            raw = await request.body()
            self._validate(request, raw)
            body = json.loads(raw)
            with self._lock:
                number = len(self.calls)
            answer = self.plan(number, body) if self.plan is not None else None
            if isinstance(answer, Delay):
                await asyncio.sleep(answer.seconds)
                answer = answer.then
            status = 200 if answer is None else answer.status_code
            with self._lock:
                self.calls.append((time.monotonic(), body, status))
                if answer is None:
                    self.accepted_bodies.append(body)
                self._lock.notify_all()
            if answer is not None:
                return answer
            return JSONResponse({"status": "success", "message": "accepted", "req_id": "r1"})

        return Starlette(
            routes=[
                Route("/v1/experiences/fetch", fetch, methods=["POST"]),
                Route("/v1/experiences/events", events, methods=["POST"]),
            ]
        )

    def _validate(self, request: Request, body: bytes) -> None:
        with self._lock:
            self._unchecked.append((request.method, str(request.url), dict(request.headers), body))


def error(status: int, headers: Mapping[str, str] | None = None) -> Response:
    """An API-style error answer."""
    return JSONResponse(
        {"title": "Error", "description": f"stand-in answered {status}"},
        status_code=status,
        headers=dict(headers or {}),
    )


async def page_view(
    store: ExperienceStore,
    tracking: Tracking,
    identity: Identity,
    keys: tuple[str, ...] = ("hero", "promo"),
) -> Personalization:
    """A page view's handle for ``identity`` with ``keys`` looked up, tracked by
    ``tracking``: what the middleware hands a template."""

    async def identify() -> Identity:
        return identity

    handle = Personalization(
        store=store,
        keys=keys,
        attributes={},
        budget=2.0,
        identity_factory=identify,
        tracking=tracking,
    )
    await handle.start()
    await handle.wait()
    return handle


# -- reading a rendered page's hooks (tokens, or indexes into the page's manifest) ----------

_HOOK_VALUE = re.compile(r' data-pz-(impression|click)="([^"]*)"')
_PAGE_MANIFEST = re.compile(r' data-pz-page="([^"]*)"')


def hook_values(text: str, kind: str | None = None) -> list[str]:
    """Every hook's value on a page, in order (``kind``: ``impression`` or ``click``):
    a token, or ``<render id>~N`` for an index into its page view's manifest."""
    return [html.unescape(v) for k, v in _HOOK_VALUE.findall(text) if kind in (None, k)]


def page_manifest(text: str, render_id: str | None = None) -> str | None:
    """The manifest of page view ``render_id`` on a page (any, if ``None``; the last
    one, as the script reads it)."""
    found = [html.unescape(m) for m in _PAGE_MANIFEST.findall(text)]
    found = [m for m in found if render_id is None or m.split(".")[1] == render_id]
    return found[-1] if found else None


def beacon(text: str, values: list[str] | None = None) -> dict[str, Any]:
    """The body the tracking script would post for ``values`` (default: every hook of
    the page), all of one page view: the events, and its manifest when they are
    indexes into it."""
    events = hook_values(text) if values is None else values
    body: dict[str, Any] = {"events": events}
    views = {v.partition("~")[0] for v in events if "~" in v}
    assert len(views) <= 1, f"hooks of several page views: {views}"
    manifest = page_manifest(text, next(iter(views))) if views else None
    if manifest is not None:
        body["page"] = manifest
    return body


def read_hooks(
    keyring: Keyring, identity: Identity, text: str, kind: str | None = None
) -> list[TrackingToken]:
    """What each hook of a rendered page stands for, verified for ``identity``."""
    body = beacon(text, hook_values(text, kind))
    return decode_events(
        keyring, identity, body["events"], page=body.get("page"), now=time.time(), decoded={}
    )
