"""What templates read: ``TemplateExperience`` (an experience with typed value readers)
and the globals / filters the extension installs (``impression``, ``track_click``,
``personalize_value``, ``personalize_experience``, ``personalize_script``).

They keep no state: the request's ``Personalization`` comes from the render context (the
template variable named by ``env.personalize_context_name``) or, failing that, from the
``current_personalization`` context variable the middleware sets.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any

from jinja2 import pass_context
from jinja2.runtime import Context, Undefined
from markupsafe import Markup
from starlette.requests import Request

from .._exceptions import TemplateUsageError
from .._models import Experience
from .._personalization import Personalization, current_personalization
from ..tracking import validate_b_id

__all__ = [
    "TemplateExperience",
    "impression",
    "personalize_experience",
    "personalize_script",
    "personalize_value",
    "track_click",
]

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
