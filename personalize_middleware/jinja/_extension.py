"""Jinja integration: the ``{% experience %}`` tag, value helpers and tracking hooks.

::

    setup_templates(templates)      # Starlette / FastAPI Jinja2Templates: one line
    setup_jinja(env)                # any jinja2.Environment

    {% experience "hero-banner" as hero %}
      <section{{ impression(hero) }}>
        <h1>{{ hero.get("Title", "Welcome") }}</h1>
        <button{{ track_click(hero, "Add to Cart") }}>Add to Cart</button>
      </section>
    {% else %}
      <h1>Welcome</h1>
    {% endexperience %}

The request's ``Personalization`` comes from the template variable ``personalize`` (the
``setup_templates`` context processor puts it there) or, failing that, from the
``current_personalization`` context variable the middleware sets.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, nodes, pass_context
from jinja2.ext import Extension
from jinja2.lexer import describe_token
from jinja2.runtime import Context, Undefined
from markupsafe import Markup
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import HTMLResponse

from .._exceptions import TemplateUsageError
from .._models import Experience
from .._personalization import Personalization, current_personalization
from ..tracking._tokens import validate_b_id

if TYPE_CHECKING:
    import jinja2
    from jinja2.parser import Parser
    from starlette.templating import Jinja2Templates
    from starlette.types import Receive, Scope, Send

__all__ = [
    "PersonalizeExtension",
    "PersonalizedTemplateResponse",
    "TemplateExperience",
    "setup_jinja",
    "setup_templates",
]

logger = logging.getLogger("personalize_middleware")

_MISSING: Any = object()
_EMPTY = Markup("")


class TemplateExperience:
    """An experience as templates see it: ``hero.Title`` / ``hero["Title"]`` read payload
    variables (a missing one is undefined), and typed readers take a default."""

    __slots__ = ("experience",)

    def __init__(self, experience: Experience) -> None:
        self.experience = experience

    def __repr__(self) -> str:
        return f"<TemplateExperience {self.experience.key!r}>"

    # No __bool__ or __len__: always true, so an experience with an empty payload is still
    # a match (and the tag's test costs no Python call).

    def __getitem__(self, name: str) -> Any:
        return self.experience.payload[name]

    def __contains__(self, name: object) -> bool:
        return name in self.experience.payload

    @property
    def key(self) -> str:
        return self.experience.key

    @property
    def variation_id(self) -> str | None:
        return self.experience.variation_id

    @property
    def payload(self) -> Mapping[str, Any]:
        return self.experience.payload

    def get(self, name: str, default: Any = None) -> Any:
        """Payload variable ``name`` (converted by its data_type), or ``default``."""
        return self.experience.get(name, default)

    def string(self, name: str, default: str = "") -> str:
        """``name`` as text (a number is written out), else ``default``."""
        value = self.experience.payload.get(name, _MISSING)
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return default

    def number(self, name: str, default: float = 0) -> float:
        """``name`` if it is a number (not a boolean), else ``default``."""
        value = self.experience.payload.get(name, _MISSING)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        return default

    def boolean(self, name: str, default: bool = False) -> bool:
        """``name`` if it is a boolean, else ``default``."""
        value = self.experience.payload.get(name, _MISSING)
        return value if isinstance(value, bool) else default

    def json(self, name: str, path: str | None = None, default: Any = None) -> Any:
        """A json variable, or the field at dotted ``path`` inside it (``"cta.label"``,
        ``"items.0"``); ``default`` when anything on the way is missing."""
        value = self.experience.payload.get(name, _MISSING)
        if not isinstance(value, dict | list):
            return default
        for part in path.split(".") if path else ():
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return default
        return value


def _unwrap(value: Any, helper: str) -> Experience | None:
    if isinstance(value, TemplateExperience):
        return value.experience
    if isinstance(value, Experience):
        return value
    if value is None or isinstance(value, Undefined):
        return None
    raise TemplateUsageError(
        f"{helper}() takes an experience (the name bound by {{% experience ... as name %}}), "
        f"got {type(value).__name__}"
    )


def _handle_from(context: Context) -> Personalization | None:
    name = getattr(context.environment, "personalize_context_name", "personalize")
    value = context.resolve_or_missing(name)  # what context.get does, minus two calls
    if isinstance(value, Personalization):
        return value
    return current_personalization.get()


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise TemplateUsageError(f"experience key must be a non-empty string, got {key!r}")
    return key


def _wrap(experience: Experience | None) -> TemplateExperience | None:
    # A fresh wrapper per lookup (~0.3 µs): kept on the experience it would form a
    # reference cycle, freed only by the cyclic GC once the cache drops the experience.
    return None if experience is None else TemplateExperience(experience)


# -- globals and filters (no state: everything comes from the render context) ---------------


@pass_context
def impression(context: Context, experience: Any) -> Markup:
    """``<section{{ impression(hero) }}>``: the impression hook (empty without tracking)."""
    if type(experience) is TemplateExperience:  # the usual case, without the calls
        found: Experience | None = experience.experience
    else:
        found = _unwrap(experience, "impression")
    handle = _handle_from(context)
    if found is None or handle is None or handle.tracking is None:
        return _EMPTY
    return handle.tracking.impression_attrs(handle, found)


@pass_context
def track_click(context: Context, experience: Any, b_id: Any) -> Markup:
    """``<button{{ track_click(hero, "Add to Cart") }}>``: the click hook. An empty, too
    long or unprintable ``b_id`` is a ``TemplateUsageError`` even when nothing matched."""
    if type(experience) is TemplateExperience:
        found: Experience | None = experience.experience
    else:
        found = _unwrap(experience, "track_click")
    handle = _handle_from(context)
    if found is None or handle is None or handle.tracking is None:
        validate_b_id(b_id)
        return _EMPTY
    return handle.tracking.click_attrs(handle, found, b_id)  # validates b_id too


@pass_context
def personalize_experience(
    context: Context, key: Any
) -> TemplateExperience | Awaitable[TemplateExperience | None] | None:
    """``{% set hero = personalize_experience("hero-banner") %}`` (``None``: no match)."""
    if type(key) is not str or not key:
        key = _check_key(key)
    handle = _handle_from(context)
    if handle is None:
        return None
    if context.environment.is_async:

        async def fetch() -> TemplateExperience | None:
            return _wrap(await handle.get(key))

        return fetch()
    return _wrap(handle.experience(key))


@pass_context
def personalize_value(context: Context, key: Any, name: str, default: Any = None) -> Any:
    """``{{ personalize_value("hero-banner", "Title", "Welcome") }}``."""
    found = personalize_experience(context, key)
    if found is None or isinstance(found, TemplateExperience):
        return default if found is None else found.get(name, default)

    async def read() -> Any:
        experience = await found
        return default if experience is None else experience.get(name, default)

    return read()


@pass_context
def personalize_script(context: Context, nonce: str | None = None) -> Markup:
    """``{{ personalize_script(nonce=csp_nonce) }}``: the tracking script tag (put it once
    in the base layout; empty when tracking is off)."""
    handle = _handle_from(context)
    if handle is None or handle.tracking is None:
        return _EMPTY
    request = context.resolve_or_missing("request")
    root_path = request.scope.get("root_path", "") if isinstance(request, Request) else ""
    return handle.tracking.script_tag(nonce, root_path=root_path)


_LOOKUP_FILTER = "_personalize_experience"


class PersonalizeExtension(Extension):
    """The ``{% experience KEY as NAME %} ... {% else %} ... {% endexperience %}`` tag,
    plus the globals ``impression``, ``track_click``, ``personalize_value``,
    ``personalize_experience``, ``personalize_script`` and the filters ``impression`` and
    ``track_click``. Settings live on the environment: ``personalize_context_name``."""

    tags = {"experience"}

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        environment.extend(personalize_context_name="personalize")
        helpers: dict[str, Callable[..., Any]] = {
            "impression": impression,
            "track_click": track_click,
            "personalize_value": personalize_value,
            "personalize_experience": personalize_experience,
            "personalize_script": personalize_script,
        }
        environment.globals.update(helpers)
        environment.filters["impression"] = impression
        environment.filters["track_click"] = track_click
        # What the tag compiles to: a filter is called directly with the context (a call
        # goes through Context.call's introspection), and awaited in async environments.
        environment.filters[_LOOKUP_FILTER] = personalize_experience

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        key = parser.parse_expression()
        if isinstance(key, nodes.Literal) and not (
            isinstance(key, nodes.Const) and isinstance(key.value, str)
        ):
            shown = key.value if isinstance(key, nodes.Const) else type(key).__name__.lower()
            parser.fail(f"experience key must be a string, got {shown!r}", key.lineno)
        if not parser.stream.skip_if("name:as"):
            parser.fail(
                "expected 'as NAME' after the experience key, got "
                f"{describe_token(parser.stream.current)!r}",
                parser.stream.current.lineno,
            )
        if parser.stream.current.type != "name":
            parser.fail(
                "expected a variable name after 'as', got "
                f"{describe_token(parser.stream.current)!r}",
                parser.stream.current.lineno,
            )
        target = parser.parse_assign_target(name_only=True)
        if parser.stream.current.type != "block_end":
            parser.fail(
                f"unexpected {describe_token(parser.stream.current)!r} in experience tag "
                '(usage: {% experience "key" as name %})',
                parser.stream.current.lineno,
            )
        body = parser.parse_statements(("name:else", "name:endexperience"))
        if next(parser.stream).test("name:else"):
            default = parser.parse_statements(("name:endexperience",), drop_needle=True)
        else:
            default = []
        lookup = nodes.Filter(key, _LOOKUP_FILTER, [], [], None, None, lineno=lineno)
        assert isinstance(target, nodes.Name)
        choose = nodes.If(nodes.Name(target.name, "load"), body, [], default, lineno=lineno)
        # With: the name is bound for the body and the else branch only (no leak).
        return nodes.With([nodes.Name(target.name, "store")], [lookup], [choose], lineno=lineno)


def setup_jinja(env: jinja2.Environment) -> None:
    """Add the personalize tag, helpers and hooks to ``env`` (sync or ``enable_async``)."""
    env.add_extension(PersonalizeExtension)
    if env.autoescape is False:
        logger.warning(
            "personalize: this Jinja environment does not autoescape; experience values "
            "are rendered as they come. Enable autoescape (select_autoescape())."
        )


# -- Starlette ------------------------------------------------------------------------------


def _request_handle(request: Request) -> Personalization | None:
    handle = request.scope.get("state", {}).get("personalize")
    return handle if isinstance(handle, Personalization) else None


def _context_processor(request: Request) -> dict[str, Any]:
    handle = _request_handle(request)
    return {} if handle is None else {"personalize": handle}


class PersonalizedTemplateResponse(HTMLResponse):
    """A template response that renders when it is sent, after waiting (at most the
    latency budget) for the request's experiences, and with ``render_async`` in async
    environments. ``template`` and ``context`` are there like on Starlette's."""

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
        """Wait for the experiences and render (idempotent)."""
        if self.rendered:
            return
        if self.handle is not None:
            await self.handle.wait()
        if self.template.environment.is_async:
            content = await self.template.render_async(self.context)
        else:
            content = self.template.render(self.context)
        self.body = self.render(content)
        self.headers["content-length"] = str(len(self.body))
        self.rendered = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.render_template()
        request = self.context.get("request")
        extensions = request.get("extensions", {}) if isinstance(request, Request) else {}
        if "http.response.debug" in extensions:  # what TestClient reads .template from
            await send(
                {
                    "type": "http.response.debug",
                    "info": {"template": self.template, "context": self.context},
                }
            )
        await super().__call__(scope, receive, send)


def setup_templates(templates: Jinja2Templates) -> None:
    """One line for Starlette / FastAPI ``Jinja2Templates``: adds the extension, a context
    processor putting the request's handle in every template as ``personalize``, and wraps
    this instance's ``TemplateResponse``: when the request's experiences are still being
    fetched (or the environment is async) it returns a ``PersonalizedTemplateResponse``
    that renders when sent; otherwise it renders at once, exactly as Starlette does."""
    setup_jinja(templates.env)
    if _context_processor not in templates.context_processors:
        templates.context_processors.append(_context_processor)
    original = templates.TemplateResponse
    if getattr(original, "__personalize_wrapped__", False):
        return

    def template_response(
        request: Request,
        name: str,
        context: dict[str, Any] | None = None,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
        background: BackgroundTask | None = None,
    ) -> HTMLResponse:
        handle = _request_handle(request)
        is_async = templates.env.is_async
        if not is_async and (handle is None or not handle.pending):
            return original(request, name, context, status_code, headers, media_type, background)
        context = context or {}
        context.setdefault("request", request)
        for processor in templates.context_processors:
            context.update(processor(request))
        return PersonalizedTemplateResponse(
            templates.get_template(name),
            context,
            status_code,
            headers,
            media_type,
            background,
            handle=handle,
        )

    template_response.__personalize_wrapped__ = True  # type: ignore[attr-defined]
    template_response.__doc__ = original.__doc__
    templates.TemplateResponse = template_response  # type: ignore[method-assign,assignment]
