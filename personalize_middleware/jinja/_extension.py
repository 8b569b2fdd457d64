"""The ``{% experience %}`` tag (``PersonalizeExtension``) and ``setup_jinja(env)``.

::

    {% experience "hero-banner" as hero %}
      <section{{ impression(hero) }}>
        <h1>{{ hero.get("Title", "Welcome") }}</h1>
        <button{{ track_click(hero, "Add to Cart") }}>Add to Cart</button>
      </section>
    {% else %}
      <h1>Welcome</h1>
    {% endexperience %}

Works in any ``jinja2.Environment``, sync or ``enable_async``; the Starlette integration
(``PersonalizeTemplates``) lives in ``_templates``. The body's reads and hooks compile to
direct calls instead of Jinja's ``Context.call`` (``_direct``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, nodes
from jinja2.ext import Extension
from jinja2.lexer import describe_token

from ._direct import CALL_FILTER, READ_FILTER, call, read, rewrite_calls
from ._readers import (
    NO_URL_HOSTS,
    URL_HOSTS_SETTING,
    impression,
    personalize_experience,
    personalize_script,
    personalize_url,
    personalize_value,
    safe_url,
    set_allowed_url_hosts,
    track_click,
)

if TYPE_CHECKING:
    import jinja2
    from jinja2.parser import Parser

__all__ = ["PersonalizeExtension", "setup_jinja"]

logger = logging.getLogger("personalize_middleware")

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
        environment.extend(**{URL_HOSTS_SETTING: NO_URL_HOSTS})  # only if not set yet
        helpers: dict[str, Callable[..., Any]] = {
            "impression": impression,
            "track_click": track_click,
            "personalize_value": personalize_value,
            "personalize_url": personalize_url,
            "personalize_experience": personalize_experience,
            "personalize_script": personalize_script,
        }
        environment.globals.update(helpers)
        environment.filters["impression"] = impression
        environment.filters["track_click"] = track_click
        environment.filters["safe_url"] = safe_url
        # What the tag compiles to: a filter is called directly with the context (a call
        # goes through Context.call's introspection), and awaited in async environments.
        environment.filters[_LOOKUP_FILTER] = personalize_experience
        # ... and what the body's reads and hooks compile to, for the same reason (_direct).
        environment.filters[READ_FILTER] = read
        environment.filters[CALL_FILTER] = call

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
        body = rewrite_calls(body, self.environment)
        default = rewrite_calls(default, self.environment)
        lookup = nodes.Filter(key, _LOOKUP_FILTER, [], [], None, None, lineno=lineno)
        assert isinstance(target, nodes.Name)
        choose = nodes.If(nodes.Name(target.name, "load"), body, [], default, lineno=lineno)
        # With: the name is bound for the body and the else branch only (no leak).
        return nodes.With([nodes.Name(target.name, "store")], [lookup], [choose], lineno=lineno)


def setup_jinja(env: jinja2.Environment, *, allowed_url_hosts: Iterable[str] | None = None) -> None:
    """Add the personalize tag, helpers and hooks to ``env`` (sync or ``enable_async``).
    ``allowed_url_hosts``: the hosts ``url`` lets absolute http(s) URLs point to (see
    ``set_allowed_url_hosts``); ``None`` keeps what ``env`` has (by default: none)."""
    env.add_extension(PersonalizeExtension)
    if allowed_url_hosts is not None:
        set_allowed_url_hosts(env, allowed_url_hosts)
    if env.autoescape is False:
        logger.warning(
            "personalize: this Jinja environment does not autoescape; experience values "
            "are rendered as they come. Enable autoescape (select_autoescape())."
        )
