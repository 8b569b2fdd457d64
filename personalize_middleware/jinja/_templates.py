"""Starlette / FastAPI templates whose responses wait for the request's experiences.

::

    templates = PersonalizeTemplates(directory="templates")

    async def home(request: Request) -> Response:
        return templates.TemplateResponse(request, "home.html", {"title": "Home"})

``PersonalizeTemplates`` is a ``Jinja2Templates`` with the extension installed and a
context processor putting the request's ``Personalization`` in every template as
``personalize``. Its ``TemplateResponse`` renders at once, with Starlette's own code,
when nothing is being fetched; while the request's fetch is in flight (or in an async
environment) it returns a ``PersonalizedTemplateResponse``, which waits for the fetch
(at most the latency budget) and renders when it is sent. Only Starlette's public API
is used: the override calls ``Jinja2Templates.TemplateResponse`` or builds an
``HTMLResponse`` subclass of ours.

``setup_templates(templates)`` does the same to a ``Jinja2Templates`` built elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any, overload

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.templating import Jinja2Templates

from .._interfaces import TrackingHooks
from .._personalization import Personalization
from ._extension import setup_jinja

if TYPE_CHECKING:
    import jinja2
    from starlette.types import Receive, Scope, Send

__all__ = ["PersonalizeTemplates", "PersonalizedTemplateResponse", "setup_templates"]

ContextProcessor = Callable[[Request], dict[str, Any]]
TemplateDirectory = str | PathLike[str] | Sequence[str | PathLike[str]]


def _request_handle(request: Request) -> Personalization | None:
    handle = request.scope.get("state", {}).get("personalize")
    return handle if isinstance(handle, Personalization) else None


def _open_manifest(handle: Personalization | None, media_type: str | None) -> TrackingHooks | None:
    """The tracking of an HTML page about to render, its hooks told to write indexes
    into the page's manifest (which the caller writes after rendering if the page did
    not: ``pending_manifest``); else ``None`` (hooks carry full tokens)."""
    tracking = handle.tracking if handle is not None else None
    if tracking is None or handle is None or media_type not in (None, "text/html"):
        return None
    tracking.open_manifest(handle)
    return tracking


def _context_processor(request: Request) -> dict[str, Any]:
    handle = _request_handle(request)
    return {} if handle is None else {"personalize": handle}


class PersonalizedTemplateResponse(HTMLResponse):
    """A template response that renders when it is sent, after waiting (at most the
    latency budget) for the request's experiences, and with ``render_async`` in async
    environments. ``template`` and ``context`` are there like on Starlette's, and
    TestClient's ``response.template`` / ``response.context`` work."""

    def __init__(
        self,
        template: jinja2.Template,
        context: dict[str, Any],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
        *,
        handle: Personalization | None = None,
    ) -> None:
        self.template = template
        self.context = context
        self.handle = handle
        self.rendered = False
        super().__init__(None, status_code, headers, media_type, background)

    async def render_template(self) -> None:
        """Wait for the experiences and render (idempotent): call it to have the body in
        the handler; otherwise sending the response does."""
        if self.rendered:
            return
        tracking = _open_manifest(self.handle, self.media_type)
        if self.handle is not None:
            await self.handle.wait()
        if self.template.environment.is_async:
            content = await self.template.render_async(self.context)
        else:
            content = self.template.render(self.context)
        if tracking is not None and self.handle is not None:
            content += tracking.pending_manifest(self.handle)
        self.body = self.render(content)
        # Only where Starlette put one (never on a 204 / 304 / 1xx response).
        if "content-length" in self.headers:
            self.headers["content-length"] = str(len(self.body))
        self.rendered = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.render_template()
        if "http.response.debug" in scope.get("extensions", {}):  # what TestClient reads
            await send(
                {
                    "type": "http.response.debug",
                    "info": {"template": self.template, "context": self.context},
                }
            )
        await super().__call__(scope, receive, send)


class PersonalizeTemplates(Jinja2Templates):
    """``Jinja2Templates`` for personalized pages: the ``{% experience %}`` tag and the
    tracking hooks in ``env``, the request's ``Personalization`` in every template as
    ``personalize``, and a ``TemplateResponse`` that waits for the request's experiences
    (at most the latency budget) before rendering. Outside a personalized request it
    behaves like ``Jinja2Templates``."""

    @overload
    def __init__(
        self,
        directory: TemplateDirectory,
        *,
        context_processors: list[ContextProcessor] | None = None,
        allowed_url_hosts: Iterable[str] | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        *,
        env: jinja2.Environment,
        context_processors: list[ContextProcessor] | None = None,
        allowed_url_hosts: Iterable[str] | None = None,
    ) -> None: ...

    def __init__(
        self,
        directory: TemplateDirectory | None = None,
        *,
        context_processors: list[ContextProcessor] | None = None,
        env: jinja2.Environment | None = None,
        allowed_url_hosts: Iterable[str] | None = None,
    ) -> None:
        if env is None:
            assert directory is not None, "either 'directory' or 'env' arguments must be passed"
            super().__init__(directory, context_processors=context_processors)
        else:
            assert directory is None, "pass 'directory' or 'env', not both"
            super().__init__(env=env, context_processors=context_processors)
        _install(self, allowed_url_hosts)

    # Starlette annotates its private response class as the return type; ours is an
    # HTMLResponse either way.
    def TemplateResponse(  # type: ignore[override]
        self,
        request: Request,
        name: str,
        context: dict[str, Any] | None = None,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
    ) -> HTMLResponse:
        """Render template ``name`` for ``request`` with ``context``, like Starlette's.
        While the request's experiences are being fetched, or when the environment is
        async, the result is a ``PersonalizedTemplateResponse`` that renders when sent."""
        handle = _request_handle(request)
        if not self.env.is_async and (handle is None or not handle.pending):
            tracking = _open_manifest(handle, media_type)
            # ``{}`` rather than None: Starlette before 1.0 calls ``context.setdefault``.
            response = super().TemplateResponse(
                request, name, context or {}, status_code, headers, media_type, background
            )
            if tracking is not None and handle is not None:
                pending = tracking.pending_manifest(handle)
                if pending:  # hooks, and no personalize_script() after them: a fragment
                    response.body = bytes(response.body) + pending.encode(response.charset)
                    if "content-length" in response.headers:
                        response.headers["content-length"] = str(len(response.body))
            return response
        context = context or {}
        context.setdefault("request", request)
        for processor in self.context_processors:
            context.update(processor(request))
        return PersonalizedTemplateResponse(
            self.get_template(name),
            context,
            status_code,
            headers,
            media_type,
            background,
            handle=handle,
        )


def _install(templates: Jinja2Templates, allowed_url_hosts: Iterable[str] | None = None) -> None:
    setup_jinja(templates.env, allowed_url_hosts=allowed_url_hosts)
    if _context_processor not in templates.context_processors:
        templates.context_processors.append(_context_processor)


#: A class of the app's own (a Jinja2Templates subclass) -> the same with ours mixed in.
_PERSONALIZED: dict[type[Jinja2Templates], type[PersonalizeTemplates]] = {}


def _personalized_class(cls: type[Jinja2Templates]) -> type[PersonalizeTemplates]:
    if issubclass(cls, PersonalizeTemplates):
        return cls
    if cls is Jinja2Templates:
        return PersonalizeTemplates
    if cls not in _PERSONALIZED:
        # Ours first in the MRO; its TemplateResponse reaches theirs through super().
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _PERSONALIZED[cls] = type(cls.__name__, (PersonalizeTemplates, cls), namespace)
    return _PERSONALIZED[cls]


def setup_templates(
    templates: Jinja2Templates, *, allowed_url_hosts: Iterable[str] | None = None
) -> None:
    """Make a ``Jinja2Templates`` built elsewhere a ``PersonalizeTemplates``: installs the
    extension and the context processor on it and switches its class (idempotent). New
    code can build ``PersonalizeTemplates(directory=...)`` directly."""
    _install(templates, allowed_url_hosts)
    templates.__class__ = _personalized_class(type(templates))
