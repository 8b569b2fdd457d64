"""Impression and click tracking: template hooks, the script, the endpoint, the batcher.

In a page whose manifest will be written (``open_manifest``, as ``PersonalizeTemplates``
does), a hook writes an index into it; the script tag, or ``pending_manifest`` after a
fragment, carries it signed once (``_pages``). Any other hook writes a signed *tracking
token* (format and verification in ``_tokens``). Both are
built from parts cached where they change: the experience part on the ``Experience``,
the signers per identity, render id, expiry and manifest on the page view's handle.

Longer than ~400 lines because ``Tracking`` is tracking's one public face: its options,
lifecycle and endpoint routing, and the template hooks' hot path beside them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import logging
import time
from collections.abc import Callable, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Literal

from markupsafe import Markup, escape

from .._config import positive_number
from .._exceptions import ConfigurationError
from .._interfaces import EventOutbox, PersonalizeBackend
from .._logging import RateLimitedLog
from .._models import Experience, Identity
from .._signing import FastSigner, Keyring
from ._batcher import (
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_EVENT_AGE,
    DEFAULT_MAX_QUEUE,
    DEFAULT_SHUTDOWN_TIMEOUT,
    EventBatcher,
)
from ._bots import check_bots, is_bot, page_user_agent
from ._endpoint import BeaconEndpoint, EndpointPaths
from ._guard import EventGuard, TrackingLimits
from ._outbox_sqlite import SQLiteOutbox
from ._pages import PAGE_ATTR, PageState, page_signer
from ._recorder import EventRecorder, TrackingStats
from ._tokens import (
    _DERIVED_KEY,
    _IMPRESSION_PART,
    TrackingToken,
    _cached_experience_part,
    _click_part,
    _page_tail,
    token_signer,
    validate_b_id,
)

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from .._interfaces import PageView

__all__ = ["CLICK_ATTR", "DEFAULT_BODY_TIMEOUT", "DEFAULT_TOKEN_TTL", "IMPRESSION_ATTR", "Tracking"]

logger = logging.getLogger("personalize_middleware.tracking")

DEFAULT_TOKEN_TTL = 3600.0
DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_MAX_EVENTS_PER_BEACON = 50
#: Seconds for a beacon's whole body to arrive (a browser sends its few KiB at once).
DEFAULT_BODY_TIMEOUT = 10.0
#: The HTML attributes the hooks write and the script reads.
IMPRESSION_ATTR = "data-pz-impression"
CLICK_ATTR = "data-pz-click"
ENDPOINT_ATTR = "data-pz-endpoint"

_CACHE_LIMIT = 256  # b_id parts and script tags kept per Tracking (template constants)
_SIGNER_CACHE_LIMIT = 4096  # identities whose token signer is kept (one sha256 saved each)
_BOT_PAGE = ("bot",)  # a page view's tracking_state when the page is a crawler's
_SCRIPT_FIRST = ("script",)  # ... when personalize_script() came before any hook
_MANAGED = ("managed",)  # ... when PersonalizeTemplates will write the page's manifest


@functools.cache
def _script() -> bytes:
    return (
        importlib.resources.files("personalize_middleware.tracking")
        .joinpath("static/personalize.js")
        .read_bytes()
    )


class Tracking:
    """Tracking hooks, the tracking script, the beacon endpoint and the event batcher.

    ``PersonalizeMiddleware`` builds one (``tracking=True``) or takes yours
    (``tracking=Tracking(...)``); it routes ``{prefix}/...`` here and starts / closes it
    with the app's lifespan. ``impressions="server"`` counts an impression when the page
    is rendered (pages without JavaScript) instead of when the element is seen.
    ``allowed_origins`` lists origins (``"https://www.example.com"``) whose beacons are
    accepted besides the request's own Host (needed when a proxy rewrites Host).
    ``flush_interval``, ``max_queue``, ``max_event_age`` and ``shutdown_timeout`` tune the
    default batcher; ``outbox`` (or ``outbox_path``, a SQLite file) makes accepted events
    survive the process (docs/tracking.md, "Durability"); pass ``batcher`` for full
    control.

    Honest numbers: with ``bots="ignore"`` (the default) a known crawler's page view gets
    no tracking attributes and its beacons are ignored (``is_bot``); ``limits`` are the
    human-timing rules and per-visitor / per-address rates (``TrackingLimits``);
    ``body_timeout`` bounds how long a beacon's body may take to arrive (408 after).
    ``clock`` is the wall clock tokens and rules use (tests pass a fake one). ``bots`` and
    ``limits`` can be changed on a running instance.
    """

    def __init__(
        self,
        *,
        keyring: Keyring,
        backend: PersonalizeBackend,
        prefix: str = "/_personalize",
        token_ttl: float = DEFAULT_TOKEN_TTL,
        max_body: int = DEFAULT_MAX_BODY,
        max_events_per_beacon: int = DEFAULT_MAX_EVENTS_PER_BEACON,
        impressions: Literal["client", "server"] = "client",
        allowed_origins: Sequence[str] = (),
        batcher: EventBatcher | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_queue: int = DEFAULT_MAX_QUEUE,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        replay_cache_size: int = 100_000,
        bots: Literal["ignore", "track"] = "ignore",
        limits: TrackingLimits | None = None,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        clock: Callable[[], float] = time.time,
        outbox: EventOutbox | None = None,
        outbox_path: str | PathLike[str] | None = None,
        max_event_age: float = DEFAULT_MAX_EVENT_AGE,
    ) -> None:
        if not prefix.startswith("/") or prefix.endswith("/") or '"' in prefix:
            raise ConfigurationError(
                "prefix must start with '/' and not end with '/'", field="prefix"
            )
        if impressions not in ("client", "server"):
            raise ConfigurationError(
                "impressions must be 'client' or 'server'", field="impressions"
            )
        check_bots(bots)
        if limits is not None and not isinstance(limits, TrackingLimits):
            raise ConfigurationError("limits must be a TrackingLimits", field="limits")
        for name, value in (
            ("token_ttl", token_ttl),
            ("max_body", max_body),
            ("max_events_per_beacon", max_events_per_beacon),
            ("body_timeout", body_timeout),
        ):
            positive_number(name, value)
        self.keyring = keyring
        self._clock = clock
        self.prefix = prefix
        self.token_ttl = float(token_ttl)
        self.impressions = impressions
        if outbox is None and outbox_path is not None:
            outbox = SQLiteOutbox(outbox_path)
        self.batcher = batcher or EventBatcher(
            backend,
            outbox=outbox,
            flush_interval=flush_interval,
            max_queue=max_queue,
            max_event_age=max_event_age,
            shutdown_timeout=shutdown_timeout,
        )
        self.stats = TrackingStats(batcher=self.batcher.stats)
        self._log = RateLimitedLog(logger)
        self._click_parts: dict[str, str] = {}
        self._signers: dict[str, tuple[FastSigner, FastSigner]] = {}
        self._script_tags: dict[str, tuple[str, Markup]] = {}
        script = _script()
        digest = hashlib.sha256(script).digest()
        #: ``sha256-<base64>`` of the script, for a CSP ``script-src`` (and SRI).
        self.script_hash = "sha256-" + base64.b64encode(digest).decode("ascii")
        self.script_path = f"{prefix}/personalize.{digest.hex()[:12]}.js"
        self.events_path = f"{prefix}/events"
        #: Where verified events go (the endpoint's beacons, server-side impressions).
        self.recorder = EventRecorder(
            keyring=keyring,
            queue=self.batcher,
            stats=self.stats,
            # A token cannot be replayed after it expires: its lifetime (+ clock slack).
            replay_window=self.token_ttl + 60,
            replay_cache_size=replay_cache_size,
        )
        self._guard = EventGuard(limits or TrackingLimits(), token_ttl=self.token_ttl, clock=clock)
        self.body_timeout = float(body_timeout)
        self._endpoint = BeaconEndpoint(
            keyring=keyring,
            recorder=self.recorder,
            guard=self._guard,
            stats=self.stats,
            paths=EndpointPaths(prefix=prefix, events=self.events_path, script=self.script_path),
            script=script,
            max_body=int(max_body),
            max_events=int(max_events_per_beacon),
            allowed_origins=allowed_origins,
            body_timeout=self.body_timeout,
            clock=clock,
            bots=bots,
        )

    def __repr__(self) -> str:
        return (
            f"Tracking(prefix={self.prefix!r}, impressions={self.impressions!r}, "
            f"bots={self.bots!r})"
        )

    @property
    def bots(self) -> Literal["ignore", "track"]:
        """``"ignore"``: known crawlers get no hooks and their beacons are dropped;
        ``"track"``: they are tracked like people."""
        return self._endpoint.bots

    @bots.setter
    def bots(self, value: Literal["ignore", "track"]) -> None:
        self._endpoint.bots = check_bots(value)

    @property
    def limits(self) -> TrackingLimits:
        """The human-timing rules and rates beacons' events pass (``TrackingLimits``).
        Setting it starts the rates afresh."""
        return self._guard.limits

    @limits.setter
    def limits(self, value: TrackingLimits) -> None:
        if not isinstance(value, TrackingLimits):
            raise ConfigurationError("limits must be a TrackingLimits", field="limits")
        self._guard.limits = value

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the event batcher (the middleware calls this on lifespan start-up)."""
        if self.bots == "ignore":
            is_bot("warm-up")  # builds the bot matcher now (~0.1 s once), not on a request
        await self.batcher.start()

    async def aclose(self, timeout: float | None = None) -> None:
        """Flush queued events within ``timeout`` (the batcher's default if ``None``)."""
        await self.batcher.aclose(timeout)

    # -- ASGI --------------------------------------------------------------------------------

    def matches(self, path: str) -> bool:
        """True for paths this object answers (everything under ``prefix``)."""
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        identity: Identity | None,
        *,
        client_ip: str | None = None,
    ) -> None:
        """Answer a request under ``prefix``: ``POST {prefix}/events`` (beacons, for the
        visitor ``identity`` resolved from this request) and ``GET`` the script. Never
        raises and never answers 500. ``client_ip`` is what the per-address rate counts
        by (the proxy-resolved address; default: the peer, ``scope["client"]``)."""
        await self._endpoint(scope, receive, send, identity, client_ip)

    # -- template hooks ------------------------------------------------------------------------

    def _new_page(self, handle: PageView, closed: bool = True) -> PageState | None:
        """This page view's ``tracking_state`` (what every hook of it shares, see
        ``PageState``), or ``None`` when the visitor cannot be attributed (no identity or
        no customer id) or is a known crawler."""
        identity = handle.identity
        if identity is None or identity.api_customer_id is None:
            self._log.debug("unattributable", "personalize: no customer id; hook left empty")
            return None
        if self._bot_page(handle):
            return None
        tail = _page_tail(handle.render_id, self._clock() + self.token_ttl)
        key = identity.cache_key
        signers = self._signers.get(key)
        if signers is None:  # once per identity, not per page view: they are the same
            if len(self._signers) >= _SIGNER_CACHE_LIMIT:
                self._signers.clear()
            signers = self._signers[key] = (
                token_signer(self.keyring, identity),
                page_signer(self.keyring, identity),
            )
        page = PageState(identity, signers[0], signers[1], tail, closed)
        handle.tracking_state = page
        return page

    def _bot_page(self, handle: PageView) -> bool:
        """A known crawler's page view (remembered in its ``tracking_state``)."""
        if handle.tracking_state is _BOT_PAGE:
            return True
        if self.bots == "ignore" and is_bot(page_user_agent(handle)):
            handle.tracking_state = _BOT_PAGE
            self.stats.bot_page_views += 1
            return True
        return False

    def _token(
        self, handle: PageView, experience: Experience, element: str, around: str = ""
    ) -> str | None:
        page = handle.tracking_state
        if type(page) is not PageState or page.identity is not handle.identity:
            page = self._new_page(handle, page is not _MANAGED)
            if page is None:
                return None
        part: str = experience.derived.get(_DERIVED_KEY) or _cached_experience_part(experience)
        # The MAC input is prefix + part + tail + element: hashed up to the element once
        # per experience and page view (the part is most of it), per element the rest.
        if around and not page.manifest.closed:  # an attribute, before the script: an index
            return around + page.index_prefix + str(page.manifest.add(part, element)) + '"'
        signer = page.signers.get(part)
        if signer is None:
            signer = page.signers[part] = page.signer.extend((part + page.tail).encode("ascii"))
        signature = signer.sign(element.encode("ascii"))
        if not around:
            return part + page.tail + element + "." + signature
        # The attribute in one join (around: its start). Unescaped: a token is base64url,
        # digits, a checked render id and dots (tests/test_tracking_tokens.py).
        return "".join((around, part, page.tail, element, ".", signature, '"'))

    def token_for(
        self, handle: PageView, experience: Experience, b_id: str | None = None
    ) -> str | None:
        """A signed token for ``experience`` on this page view, or ``None`` when the
        visitor cannot be attributed (no resolved identity or no customer id)."""
        element = _IMPRESSION_PART if b_id is None else self._click_part(b_id)
        return self._token(handle, experience, element)

    def _click_part(self, b_id: object) -> str:
        # b_ids are template constants: validated and encoded once each (bounded).
        part = self._click_parts.get(b_id) if type(b_id) is str else None
        if part is None:
            part = _click_part(validate_b_id(b_id))
            if len(self._click_parts) < _CACHE_LIMIT:
                self._click_parts[b_id] = part  # type: ignore[index]
        return part

    def impression_attrs(self, handle: PageView, experience: Experience) -> Markup:
        """The attribute for the element showing ``experience``. With
        ``impressions="server"`` the impression is recorded now and nothing is emitted."""
        if self.impressions == "server":
            identity = handle.identity
            if identity is not None and not self._bot_page(handle):
                self._record_server_impression(identity, handle.render_id, experience)
            return _EMPTY
        attribute = self._token(handle, experience, _IMPRESSION_PART, _IMPRESSION_PREFIX)
        return _EMPTY if attribute is None else _new_str(Markup, attribute)

    def _record_server_impression(
        self, identity: Identity, render_id: str, experience: Experience
    ) -> None:
        # Once per page view and experience, however often the hook is rendered.
        event = TrackingToken(
            kind="shown",
            key=experience.key,
            context=experience.experience_context,
            render_id=render_id,
            expires=0,
        )
        if self.recorder.record(identity, event, self._clock()):
            self.stats.server_impressions += 1

    def click_attrs(self, handle: PageView, experience: Experience, b_id: object) -> Markup:
        """The attribute for a clickable element inside ``experience``; ``b_id`` names it
        (``"Add to Cart"``). Raises ``TemplateUsageError`` for an invalid ``b_id``."""
        attribute = self._token(handle, experience, self._click_part(b_id), _CLICK_PREFIX)
        return _EMPTY if attribute is None else _new_str(Markup, attribute)

    def script_tag(
        self, nonce: str | None = None, *, root_path: str = "", page: PageView | None = None
    ) -> Markup:
        """``<script>`` for the tracking script: deferred, with an ``integrity`` hash (so a
        CSP listing ``script_hash`` allows it) and an optional CSP ``nonce``. With the
        ``page`` view, it carries the manifest of the hooks rendered so far (``_pages``);
        hooks rendered after it carry full tokens."""
        tags = self._script_tags.get(root_path)
        if tags is None:
            start = (
                f'<script defer src="{_esc(root_path + self.script_path)}" '
                f'integrity="{_esc(self.script_hash)}" '
                f'{ENDPOINT_ATTR}="{_esc(root_path + self.events_path)}"'
            )
            tags = (start, Markup(start + "></script>"))  # noqa: S704 - built escaped
            if len(self._script_tags) < _CACHE_LIMIT:  # root_path comes from the server
                self._script_tags[root_path] = tags
        manifest = self._close_page(page) if page is not None else ""
        if nonce or manifest:
            nonce_attr = ' nonce="' + _esc(nonce) + '"' if nonce else ""
            # The manifest is base64url, digits, "~" and dots: nothing to escape.
            return _new_str(Markup, tags[0] + manifest + nonce_attr + "></script>")
        return tags[1]

    def open_manifest(self, page: PageView) -> None:
        """The page view's hooks write indexes into its manifest from now on: the caller
        promises to write it (``personalize_script()`` in the page, or
        ``pending_manifest`` after rendering; ``PersonalizeTemplates`` does both)."""
        if page.tracking_state is None:
            page.tracking_state = _MANAGED

    def pending_manifest(self, page: PageView) -> str:
        """``<template data-pz-page="...">`` for the hooks the page view wrote since its
        last manifest ("" if none); its next hooks carry full tokens."""
        found = self._close_page(page)
        return f"<template{found}></template>" if found else ""

    def _close_page(self, page: PageView) -> str:
        """The manifest attribute of the hooks ``page`` rendered so far ("" if none);
        later hooks carry full tokens."""
        state = page.tracking_state
        if state is None or state is _MANAGED:
            page.tracking_state = _SCRIPT_FIRST
        elif type(state) is PageState and not state.manifest.closed:
            state.manifest.closed = True
            if state.manifest.elements and state.identity is page.identity:
                manifest = state.manifest.encode(state.page_signer, state.tail)
                return f' {PAGE_ATTR}="{manifest}"'
        return ""


_EMPTY = Markup("")
_IMPRESSION_PREFIX = " " + IMPRESSION_ATTR + '="'
_CLICK_PREFIX = " " + CLICK_ATTR + '="'
#: ``_new_str(Markup, text)``: Markup's own __new__ only adds a look for __html__.
_new_str = str.__new__


def _esc(value: object) -> str:
    # A plain str: concatenating a str with Markup would escape the str side too.
    return str(escape(value))
