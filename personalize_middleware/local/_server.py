"""A MoEngage-compatible HTTP server in front of ``LocalBackend``.

It speaks the exact wire format of the three endpoints under ``/v1`` (so any client, ours
included, can be pointed at ``http://host:port/v1``): ``MOE-APPKEY`` and Basic auth are
checked (400 for a missing or unknown workspace, 401 for bad credentials), bodies are
validated like the API validates them, more than 25 keys silently keeps the first 25,
more than 100 event elements is a 400, and errors carry ``{"title", "description"}``.
The local report is served at ``/report/``, behind the same Basic credentials as the API
(a browser asks for them: user = workspace id, password = API secret).

What a client sends is bounded before it is read: the request target and headers together
(``MAX_HEAD_BYTES``, 414/431) and the body (``MAX_BODY_BYTES``, 413). uvicorn does not
bound heads reliably, hence the check here: h11 refuses one over 16 KiB only while it is
still incomplete (a 100 KiB head sent at once gets through), and with httptools uvicorn sets
no limit. The device rule looks at the first 512 characters of a User-Agent.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import secrets
import string
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .._config import PersonalizeSettings
from .._exceptions import BadRequestError
from .._models import EventElement
from ._backend import LocalBackend
from ._report_app import local_report_app
from ._wire import WireError, error_code, validate_events_body, validate_fetch_body

__all__ = ["MAX_BODY_BYTES", "MAX_HEAD_BYTES", "create_local_server"]

#: Request bodies above this are refused (100 elements of events fit easily).
MAX_BODY_BYTES = 1024 * 1024
#: Request targets plus headers above this are refused: h11's default limit, whatever the
#: HTTP server in front.
MAX_HEAD_BYTES = 16 * 1024
_ACCEPTED = "Your request has been accepted and will be processed soon."


def create_local_server(
    backend: LocalBackend, *, workspace_id: str, api_secret: str, report: bool = True
) -> Starlette:
    """A Starlette app answering Fetch Experience, Fetch Experience Metadata and Track
    Experience Events like MoEngage does, from ``backend``. Clients use the base URL
    ``http://host:port/v1`` with these ``workspace_id`` and ``api_secret``."""
    # Reuse the settings' validation so a bad workspace id fails here, not on every call.
    PersonalizeSettings(workspace_id=workspace_id, api_secret=api_secret)
    expected_auth = f"{workspace_id}:{api_secret}".encode()

    def refuse(request: Request) -> Response | None:
        appkey = request.headers.get("moe-appkey")
        if not appkey or not hmac.compare_digest(appkey.encode(), workspace_id.encode()):
            return _error(
                400,
                "Request Error",
                "MoEngage Client not found. Please check values for headers - MOE-APPKEY or "
                "MOE-DBNAME",
            )
        if not hmac.compare_digest(_basic_credentials(request), expected_auth):
            return _error(
                401, "Authentication required", "Invalid API_KEY used in Authentication Header"
            )
        return None

    async def fetch(request: Request) -> Response:
        if (refused := refuse(request)) is not None:
            return refused
        try:
            body = validate_fetch_body(await _json_body(request))
            experiences = backend.evaluate(
                body.keys,
                customer_id=body.customer_id,
                user_identifiers=body.user_identifiers,
                attributes=body.attributes,
            )
        except _Refused as exc:
            return exc.response
        except WireError as exc:
            return _error(400, exc.title, exc.description, code=error_code())
        except BadRequestError as exc:
            return _bad_request(exc)
        return JSONResponse({"experiences": experiences})

    async def metadata(request: Request) -> Response:
        if (refused := refuse(request)) is not None:
            return refused
        raw = request.query_params.get("status")
        statuses = None if not raw else [s.strip() for s in raw.split(",")]
        items = backend.metadata(statuses)
        experiences = [
            {"experience_name": m.name, "experience_key": m.key, "status": m.status} for m in items
        ]
        return JSONResponse({"metadata": {"count": len(experiences), "experiences": experiences}})

    async def events(request: Request) -> Response:
        if (refused := refuse(request)) is not None:
            return refused
        try:
            elements = validate_events_body(await _json_body(request))
            await backend.track_events(cast("list[EventElement]", elements))
        except _Refused as exc:
            return exc.response
        except WireError as exc:
            return _error(400, exc.title, exc.description, code=error_code())
        except BadRequestError as exc:
            return _bad_request(exc)
        return JSONResponse({"status": "success", "message": _ACCEPTED, "req_id": _req_id()})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        titles = {404: "Not Found", 405: "Method Not Allowed"}
        return _error(
            status, titles.get(status, "Request Error"), f"{request.method} {request.url.path}"
        )

    async def to_report(request: Request) -> Response:
        return RedirectResponse("/report/")

    routes: list[Route | Mount] = [
        Route("/v1/experiences/fetch", fetch, methods=["POST"]),
        Route("/v1/experiences/metadata", metadata, methods=["GET"]),
        Route("/v1/experiences/events", events, methods=["POST"]),
    ]
    if report:
        report_app = _basic_auth(local_report_app(backend), expected_auth)
        routes += [Route("/report", to_report), Mount("/report", app=report_app)]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(_HeadLimit)],
    )


class _HeadLimit:
    """Refuses a request whose target or headers are over ``MAX_HEAD_BYTES``, before the
    app reads any of them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = _head_refusal(scope) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _head_refusal(scope: Scope) -> Response | None:
    raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogatepass")
    target = len(raw_path) + len(scope.get("query_string") or b"")
    limit = f"limited to {MAX_HEAD_BYTES} bytes"
    if target > MAX_HEAD_BYTES:
        return _error(414, "URI Too Long", f"Request targets are {limit}")
    if target + sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEAD_BYTES:
        return _error(431, "Request Header Fields Too Large", f"Request headers are {limit}")
    return None


def _basic_auth(app: ASGIApp, expected: bytes) -> ASGIApp:
    """``app`` behind HTTP Basic auth (401 with a challenge, so browsers ask)."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not hmac.compare_digest(
            _basic_credentials(Request(scope)), expected
        ):
            challenge = {"www-authenticate": 'Basic realm="personalize-middleware local report"'}
            response = PlainTextResponse("Authentication required", 401, headers=challenge)
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return guarded


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


async def _json_body(request: Request) -> Any:
    if _declares_too_much(request):
        raise _too_large()  # before reading a byte of it
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, RecursionError):
        raise _Refused(
            _error(
                400,
                "Malformed JSON",
                "Could not decode the request body. "
                "The JSON was incorrect or not encoded as UTF-8.",
            )
        ) from None


def _declares_too_much(request: Request) -> bool:
    declared = request.headers.get("content-length", "").lstrip("0")
    if not (declared.isascii() and declared.isdigit()):
        return False
    return len(declared) > len(str(MAX_BODY_BYTES)) or int(declared) > MAX_BODY_BYTES


def _too_large() -> _Refused:
    return _Refused(
        _error(413, "Payload Too Large", f"Request bodies are limited to {MAX_BODY_BYTES} bytes")
    )


def _basic_credentials(request: Request) -> bytes:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return b""
    try:
        return base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b""


def _error(status: int, title: str, description: str, *, code: str | None = None) -> Response:
    body = {"title": title, "description": description}
    if code is not None:
        body["code"] = code
    return JSONResponse(body, status_code=status)


def _bad_request(exc: BadRequestError) -> Response:
    return _error(
        400,
        exc.title or "Invalid Field Value",
        exc.description or str(exc),
        code=exc.code or error_code(),
    )


def _req_id() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(8))
