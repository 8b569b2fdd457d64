"""``DevTools`` (one per middleware) and ``DevSession`` (one per request that uses them).

``DevTools.session(scope, cookie_header)`` runs for every request while any tool is on;
without a grant cookie it is one substring test and returns a shared session (overlay
or Server-Timing for everyone) or ``None``. With one, the cookie is verified (the
verified values are remembered, bounded, their expiry checked every time) and the
request gets its own ``DevSession``.

``DevTools.handle`` answers its endpoints under the tracking prefix::

    GET {prefix}/preview?token=...&next=/path    verify, set the preview cookie, redirect
    GET {prefix}/preview/exit?next=/path         clear it, redirect
    GET {prefix}/qa?token=...&next=/path         the same for the QA cookie
    GET {prefix}/qa/exit?next=/path
    GET {prefix}/devtools.<hash>.js | .css       the overlay's script and stylesheet
    POST {prefix}/... from a previewing browser  204, dropped: a preview reports nothing

A forged, tampered or expired token (or preview links while ``preview`` is off) sets
nothing and redirects all the same: the browser sees the normal page, never an error.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import logging
import time
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from markupsafe import Markup
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from .._grants import (
    COOKIE_PREFIX,
    PREVIEW_COOKIE,
    QA_COOKIE,
    PreviewGrant,
    QAGrant,
    decode_preview,
    decode_qa,
    safe_next,
)
from .._identity import cookie_value
from .._interfaces import InspectedPage
from .._logging import RateLimitedLog
from .._signing import Keyring
from ._overlay import Assets, PageState, page_markup, server_timing

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

__all__ = ["DevSession", "DevTools"]

logger = logging.getLogger("personalize_middleware.devtools")

_VERIFIED_LIMIT = 1024
_IMMUTABLE = "public, max-age=31536000, immutable"
_NO_STORE = {"cache-control": "no-store", "referrer-policy": "no-referrer"}


@functools.cache
def _asset(name: str) -> bytes:
    return importlib.resources.files(__package__ or __name__).joinpath("static", name).read_bytes()


def _sri(content: bytes) -> tuple[str, str]:
    digest = hashlib.sha256(content).digest()
    return "sha256-" + base64.b64encode(digest).decode("ascii"), digest.hex()[:12]


class DevTools:
    """The middleware's developer tools: preview links (``preview``), QA cookies
    (``qa_cookies``), the overlay for every page (``overlay``), ``Server-Timing`` on every
    personalized response (``server_timing``). See ``docs/preview.md``."""

    def __init__(
        self,
        *,
        keyring: Keyring,
        prefix: str,
        preview: bool = False,
        qa_cookies: bool = True,
        overlay: bool = False,
        server_timing: bool = False,
        experience_part: Callable[[Any], str] | None = None,
    ) -> None:
        self.keyring = keyring
        self.prefix = prefix
        self.preview_enabled = preview
        self.qa_enabled = qa_cookies
        self.overlay_all = overlay
        self.server_timing_all = server_timing
        self.script_hash, script_tag = _sri(_asset("overlay.js"))
        style_hash, style_tag = _sri(_asset("devtools.css"))
        self.script_path = f"{prefix}/devtools.{script_tag}.js"
        self.style_path = f"{prefix}/devtools.{style_tag}.css"
        self.assets = Assets(
            prefix=prefix,
            script_path=self.script_path,
            script_hash=self.script_hash,
            style_path=self.style_path,
            style_hash=style_hash,
            experience_part=experience_part,
        )
        self._endpoints: dict[str, Callable[[Scope], Response]] = {
            prefix + "/preview": self._enter_preview,
            prefix + "/preview/exit": functools.partial(_leave, PREVIEW_COOKIE),
            prefix + "/qa": self._enter_qa,
            prefix + "/qa/exit": functools.partial(_leave, QA_COOKIE),
            self.script_path: functools.partial(_static, "overlay.js", "text/javascript"),
            self.style_path: functools.partial(_static, "devtools.css", "text/css"),
        }
        #: Beacons of previewing browsers, answered and dropped (see ``intercept``).
        self.dropped_beacons = 0
        self._previews: dict[str, PreviewGrant] = {}
        self._qas: dict[str, QAGrant] = {}
        self._log = RateLimitedLog(logger)
        self._everyone = (
            DevSession(self, overlay=overlay, server_timing=server_timing)
            if overlay or server_timing
            else None
        )

    @property
    def enabled(self) -> bool:
        """False when every tool is off: the middleware then never calls ``session``."""
        return self.preview_enabled or self.qa_enabled or self._everyone is not None

    def __repr__(self) -> str:
        return (
            f"DevTools(preview={self.preview_enabled}, qa_cookies={self.qa_enabled}, "
            f"overlay={self.overlay_all}, server_timing={self.server_timing_all})"
        )

    # -- per request -------------------------------------------------------------------------

    def session(self, scope: Scope, cookie_header: str | None) -> DevSession | None:
        """The request's tools: ``None`` (none), a shared session (no grant cookie), or
        its own (a valid preview or QA cookie)."""
        if not cookie_header or COOKIE_PREFIX not in cookie_header:
            return self._everyone
        preview = self.preview_grant(cookie_header)
        qa = self.qa_grant(cookie_header)
        if preview is None and qa is None:
            return self._everyone
        return DevSession(
            self,
            preview=preview,
            qa=qa,
            overlay=self.overlay_all or qa is not None,
            server_timing=self.server_timing_all or qa is not None,
            here=_here(scope) if preview is not None else "/",
        )

    def preview_grant(self, cookie_header: str | None) -> PreviewGrant | None:
        """The valid preview grant in ``cookie_header``, if previews are on."""
        if not self.preview_enabled or not cookie_header or PREVIEW_COOKIE not in cookie_header:
            return None
        token = cookie_value(cookie_header, PREVIEW_COOKIE)
        if not token:
            return None
        grant = self._previews.get(token)
        if grant is None:
            grant = decode_preview(self.keyring, token)
            if grant is None:
                return None
            _remember(self._previews, token, grant)
        return grant if grant.expires > time.time() else None

    def qa_grant(self, cookie_header: str | None) -> QAGrant | None:
        if not self.qa_enabled or not cookie_header or QA_COOKIE not in cookie_header:
            return None
        token = cookie_value(cookie_header, QA_COOKIE)
        if not token:
            return None
        grant = self._qas.get(token)
        if grant is None:
            grant = decode_qa(self.keyring, token)
            if grant is None:
                return None
            _remember(self._qas, token, grant)
        return grant if grant.expires > time.time() else None

    # -- endpoints ---------------------------------------------------------------------------

    def matches(self, path: str) -> bool:
        return path in self._endpoints

    async def intercept(
        self, scope: Scope, receive: Receive, send: Send, cookie_header: str | None
    ) -> bool:
        """For a request under the tracking prefix: answer it and return ``True`` when it
        is one of ours, or a beacon from a previewing browser (answered 204, dropped:
        whatever it reports, tokens of a page seen before the preview say, must not
        count); else ``False``."""
        if scope["path"] in self._endpoints:
            await self.handle(scope, receive, send)
            return True
        if scope["method"] == "POST" and self.preview_grant(cookie_header) is not None:
            self.dropped_beacons += 1
            await Response(status_code=204, headers=_NO_STORE)(scope, receive, send)
            return True
        return False

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one of ``matches``' paths (GET / HEAD; never a 500)."""
        if scope["method"] not in ("GET", "HEAD"):
            response: Response = PlainTextResponse(
                "method not allowed", 405, headers={**_NO_STORE, "allow": "GET, HEAD"}
            )
        else:
            try:
                response = self._endpoints[scope["path"]](scope)
            except Exception as exc:  # the boundary: a normal page rather than a 500
                self._log.exception(
                    "endpoint", "personalize: devtools endpoint failed", exc_info=exc
                )
                response = _redirect(_root(scope) + "/")
        await response(scope, receive, send)

    def _enter_preview(self, scope: Scope) -> Response:
        query = _query(scope)
        target = safe_next(query.get("next"), _root(scope) + "/")
        if not self.preview_enabled:
            self._log.warning(
                "preview-off",
                "personalize: a preview link was opened but previews are off "
                "(PersonalizeMiddleware(preview=True)); showing the normal page",
            )
            return _redirect(target)
        grant = decode_preview(self.keyring, query.get("token"))
        if grant is None:
            self._log.warning("preview-bad", "personalize: forged or expired preview link ignored")
            return _redirect(target)
        return _redirect(target, _cookie(scope, PREVIEW_COOKIE, query["token"], grant.expires))

    def _enter_qa(self, scope: Scope) -> Response:
        query = _query(scope)
        target = safe_next(query.get("next"), _root(scope) + "/")
        grant = decode_qa(self.keyring, query.get("token")) if self.qa_enabled else None
        if grant is None:
            self._log.warning("qa-bad", "personalize: QA link ignored (forged, expired or QA off)")
            return _redirect(target)
        return _redirect(target, _cookie(scope, QA_COOKIE, query["token"], grant.expires))


class DevSession:
    """One request's developer tools (``Personalization.devtools``): a ``PageTools``."""

    __slots__ = ("here", "overlay", "preview", "qa", "server_timing", "tools")

    def __init__(
        self,
        tools: DevTools,
        *,
        preview: PreviewGrant | None = None,
        qa: QAGrant | None = None,
        overlay: bool = False,
        server_timing: bool = False,
        here: str = "/",
    ) -> None:
        self.tools = tools
        self.preview = preview
        self.qa = qa
        self.overlay = overlay
        self.server_timing = server_timing
        #: This page (path and query), where "exit preview" comes back to.
        self.here = here

    def __repr__(self) -> str:
        return (
            f"DevSession(preview={self.preview is not None}, qa={self.qa is not None}, "
            f"overlay={self.overlay}, server_timing={self.server_timing})"
        )

    @property
    def script_hashes(self) -> tuple[str, ...]:
        """The scripts ``page_markup`` adds, for a CSP ``script-src``."""
        return (self.tools.script_hash,) if self.overlay else ()

    def page_markup(
        self, page: InspectedPage, nonce: str | None = None, *, root_path: str = ""
    ) -> Markup:
        state = PageState(self.tools.assets, self.preview, self.qa, self.overlay, self.here)
        return page_markup(state, page, nonce, root_path)

    def decorate(self, message: MutableMapping[str, Any], page: InspectedPage) -> None:
        """``Server-Timing`` when on (the response is personalized: see the caller)."""
        if self.server_timing:
            headers = message.setdefault("headers", [])
            headers.append((b"server-timing", server_timing(page)))


# -- helpers ----------------------------------------------------------------------------------


def _remember(cache: dict[str, Any], token: str, grant: Any) -> None:
    if len(cache) >= _VERIFIED_LIMIT:
        cache.clear()
    cache[token] = grant


def _root(scope: Scope) -> str:
    return str(scope.get("root_path", ""))


def _here(scope: Scope) -> str:
    raw = scope.get("raw_path")
    # The ASGI raw_path has no query; older Starlette TestClients put it
    # there anyway: the query comes from query_string alone.
    path = (
        raw.split(b"?", 1)[0].decode("latin-1")
        if isinstance(raw, bytes)
        else str(scope.get("path", "/"))
    )
    query = scope.get("query_string", b"")
    return safe_next(path + ("?" + query.decode("latin-1") if query else ""), _root(scope) + "/")


def _query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    if len(raw) > 8192:
        return {}
    return dict(parse_qsl(raw, keep_blank_values=False))


def _cookie(scope: Scope, name: str, token: str, expires: int) -> str:
    max_age = max(1, int(expires - time.time()))
    parts = [f"{name}={token}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
    if scope.get("scheme") == "https":
        parts.append("Secure")
    return "; ".join(parts)


def _redirect(target: str, set_cookie: str | None = None) -> Response:
    response = RedirectResponse(target, status_code=303, headers=_NO_STORE)
    if set_cookie is not None:
        response.raw_headers.append((b"set-cookie", set_cookie.encode("latin-1")))
    return response


def _leave(name: str, scope: Scope) -> Response:
    target = safe_next(_query(scope).get("next"), _root(scope) + "/")
    cleared = f"{name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
    return _redirect(target, cleared)


def _static(name: str, media_type: str, scope: Scope) -> Response:
    content = _asset(name)
    headers = {"cache-control": _IMMUTABLE, "x-content-type-options": "nosniff"}
    body = b"" if scope["method"] == "HEAD" else content
    response = Response(body, headers=headers, media_type=f"{media_type}; charset=utf-8")
    response.headers["content-length"] = str(len(content))
    return response
