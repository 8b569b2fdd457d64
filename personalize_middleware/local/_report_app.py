"""The local report page: ``render_report`` draws a ``Report`` with a Jinja template and
``local_report_app`` serves it, and its JSON, from any ``ReportSource``.

The page is ``templates/report.html``: plain HTML, CSS bars, no script, no third-party
asset, rendered with autoescaping on (experience names, labels and ``b_id``s come from
events, so from browsers). The app answers with Starlette responses carrying a
Content-Security-Policy that lets no script run at all.
"""

from __future__ import annotations

import functools

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .._exceptions import ConfigurationError
from ._report import Report, ReportSource

__all__ = ["REPORT_TEMPLATE", "local_report_app", "render_report"]

#: The template ``render_report`` renders (in this package's ``templates`` directory).
REPORT_TEMPLATE = "report.html"
_DEFAULT_TITLE = "Personalize local report"

_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    # Inline styles only: the bars are style attributes; no script may run at all.
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'",
}


@functools.cache
def _environment() -> Environment:
    # Built once, on first use: a process that never shows the report never loads it.
    environment = Environment(
        loader=PackageLoader("personalize_middleware.local", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["percent"] = _percent
    environment.filters["bar_width"] = _bar_width
    return environment


def render_report(report: Report, *, title: str = _DEFAULT_TITLE) -> str:
    """The report as a self-contained HTML page (no script, every value escaped)."""
    return _environment().get_template(REPORT_TEMPLATE).render(report=report, title=title)


def _percent(ctr: float | None) -> str:
    return "—" if ctr is None else f"{ctr:.1%}"


def _bar_width(value: int, maximum: int) -> str:
    width = min(100.0, 100.0 * value / maximum) if maximum else 0.0
    return f"{width:.1f}"


def local_report_app(source: ReportSource, *, title: str = _DEFAULT_TITLE) -> ASGIApp:
    """An ASGI app serving the report of ``source`` (anything with a ``report()`` method
    returning a ``Report``: a ``LocalBackend``, a ``ReportCounter``, ...).

    Any path ending in ``/report.json`` gets the data as JSON (``Report.to_json``); every
    other GET or HEAD path gets the page, so it works mounted under any prefix (a
    Starlette ``Mount``, or a dispatcher passing the full path). Other methods get 405.
    ``TypeError`` here, at creation, if ``source`` has no ``report`` method.
    """
    if not isinstance(source, ReportSource):
        raise ConfigurationError(
            f"local_report_app needs an object with a report() method, not {type(source).__name__}",
            field="source",
        )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        response = _response(source, scope["method"], scope.get("path", ""), title)
        await response(scope, receive, send)

    return app


def _response(source: ReportSource, method: str, path: str, title: str) -> Response:
    if method not in ("GET", "HEAD"):
        return PlainTextResponse(
            "Method Not Allowed",
            status_code=405,
            headers={**_SECURITY_HEADERS, "allow": "GET, HEAD"},
        )
    response: Response
    if path.endswith("/report.json"):
        response = JSONResponse(source.report().to_json(), headers=_SECURITY_HEADERS)
    else:
        # Whatever path a dispatcher hands over (a Mount's, or the full one): the page.
        response = HTMLResponse(
            render_report(source.report(), title=title), headers=_SECURITY_HEADERS
        )
    return _without_body(response) if method == "HEAD" else response


def _without_body(response: Response) -> Response:
    """HEAD: the GET's status and headers (its content-length included), no body."""
    return Response(status_code=response.status_code, headers=dict(response.headers))


async def _lifespan(receive: Receive, send: Send) -> None:
    # Nothing to start or stop; answering keeps servers happy when run standalone.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
