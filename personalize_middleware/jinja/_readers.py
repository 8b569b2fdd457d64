"""What templates read: ``TemplateExperience`` (an experience with typed value readers)
and the globals / filters the extension installs (``impression``, ``track_click``,
``personalize_value``, ``personalize_url``, ``personalize_experience``,
``personalize_script``, the ``safe_url`` filter).

They keep no state: the request's ``Personalization`` comes from the render context (the
template variable named by ``env.personalize_context_name``) or, failing that, from the
``current_personalization`` context variable the middleware sets. The hosts absolute URLs
may point to live on the environment too (``env.personalize_allowed_url_hosts``, set by
``set_allowed_url_hosts``).

Why a URL reader: escaping keeps a value inside its attribute, but in ``href``, ``src``
or ``action`` the value IS the URL, and ``javascript:alert(1)`` escapes to itself.
``url`` lets through only ``http(s)://`` URLs on an allowed host and paths on this site
(``/...``), checked character by character the way a browser reads them (see
``checked_url``); anything else renders the template's default.

Longer than ~400 lines because the readers and the URL checks they apply are one unit:
what a template can read and how each value is made safe, side by side.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

from jinja2 import Environment, pass_context, pass_environment
from jinja2.runtime import Context, Undefined
from markupsafe import Markup
from starlette.requests import Request

from .._decisions import Decision
from .._exceptions import ConfigurationError, TemplateUsageError
from .._models import Experience
from .._personalization import Personalization, current_personalization
from ..tracking import validate_b_id

__all__ = [
    "MAX_URL_LENGTH",
    "NO_URL_HOSTS",
    "URL_HOSTS_SETTING",
    "TemplateExperience",
    "checked_url",
    "impression",
    "personalize_experience",
    "personalize_script",
    "personalize_url",
    "personalize_value",
    "safe_url",
    "set_allowed_url_hosts",
    "track_click",
    "url_hosts",
]

_MISSING: Any = object()
_EMPTY = Markup("")

#: Longer payload "URLs" are refused (the default renders): no campaign link needs more.
MAX_URL_LENGTH = 2048
#: The environment attribute holding the hosts absolute URLs may point to.
URL_HOSTS_SETTING = "personalize_allowed_url_hosts"

# Lowercase DNS labels (or an IPv4 address), dot-separated; no percent-escapes, no IDN
# (its punycode form, xn--..., works), no brackets: the browser then sees this very host.
_HOST_RE = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_PORT_RE = re.compile(r"[0-9]{0,5}")
# Never in a URL we hand out: quotes and angle brackets would end an attribute where
# autoescaping is off, a backslash is a slash to browsers ("/\\evil.example"), a
# backtick ends an attribute in old Internet Explorer.
_URL_REFUSED_CHARS = frozenset("\"'<>`\\")
_URL_SCHEMES = ("http://", "https://")


class _URLHosts(frozenset[str]):
    """Normalised allowed hosts (``url_hosts`` made it): lowercase names, ``*.suffix``
    wildcards, or ``*`` for any host."""

    __slots__ = ()


NO_URL_HOSTS = _URLHosts()


class TemplateExperience:
    """An experience as templates see it: ``hero.Title`` / ``hero["Title"]`` read payload
    variables (a missing one is undefined), and typed readers take a default.

    ``allowed_url_hosts``: the hosts ``url`` lets absolute URLs point to (the tag and
    ``personalize_experience`` pass the environment's, see ``set_allowed_url_hosts``).
    ``page``: the request's ``Personalization``, which ``why`` asks (the experience itself
    is shared between users and cannot say how this request got it)."""

    __slots__ = ("allowed_url_hosts", "experience", "page")

    def __init__(
        self,
        experience: Experience,
        *,
        allowed_url_hosts: Iterable[str] = NO_URL_HOSTS,
        page: Personalization | None = None,
    ) -> None:
        self.experience = experience
        self.allowed_url_hosts = url_hosts(allowed_url_hosts)
        self.page = page

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

    @property
    def why(self) -> Decision | None:
        """Where this request's answer came from and why: ``{{ hero.why }}`` reads
        ``cache (12 s old)``; ``hero.why.source``, ``.reason``, ``.age``, ``.fetch_ms``."""
        return self.page.why(self.experience.key) if self.page is not None else None

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

    def url(self, name: str, default: str = "") -> str:
        """``name`` if it is a URL safe to put in ``href``, ``src``, ``action`` or
        ``formaction``: an ``http(s)://`` URL on an allowed host, or a path on this site
        (``/sale``, not ``//host``); else ``default`` (see ``checked_url``)."""
        found = checked_url(self.experience.payload.get(name), self.allowed_url_hosts)
        return default if found is None else found

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


def _wrap(
    experience: Experience | None, env: Environment, page: Personalization
) -> TemplateExperience | None:
    # A fresh wrapper per lookup (~0.3 µs): kept on the experience it would form a
    # reference cycle, freed only by the cyclic GC once the cache drops the experience
    # (and the experience is shared between users: the page's story belongs here).
    if experience is None:
        return None
    hosts = getattr(env, URL_HOSTS_SETTING, NO_URL_HOSTS)
    return TemplateExperience(experience, allowed_url_hosts=hosts, page=page)


# -- globals and filters (no state: everything comes from the render context) ---------------


@pass_context
def impression(context: Context, experience: Any) -> Markup:
    """``<section{{ impression(hero) }}>``: the impression hook (empty without tracking)."""
    if type(experience) is TemplateExperience:  # the usual case, without the calls
        found: Experience | None = experience.experience
        # The request's handle the tag found it with: what _handle_from would find.
        handle = experience.page or _handle_from(context)
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
        handle = experience.page or _handle_from(context)
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
    env = context.environment
    if env.is_async:

        async def fetch() -> TemplateExperience | None:
            return _wrap(await handle.get(key), env, handle)

        return fetch()
    return _wrap(handle.experience(key), env, handle)


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
def personalize_url(context: Context, key: Any, name: str, default: str = "") -> Any:
    """``<a href="{{ personalize_url("hero-banner", "CtaUrl", "/sale") }}">``: one URL
    value without the tag, checked like ``TemplateExperience.url``."""
    found = personalize_experience(context, key)
    if found is None or isinstance(found, TemplateExperience):
        return default if found is None else found.url(name, default)

    async def read() -> str:
        experience = await found
        return default if experience is None else experience.url(name, default)

    return read()


@pass_environment
def safe_url(env: Environment, value: Any, default: str = "") -> str:
    """The ``safe_url`` filter, for a URL found elsewhere than in a payload string
    variable, e.g. a field of a json value::

        {{ hero.json("Config", "cta.href") | safe_url("/") }}
    """
    found = checked_url(value, getattr(env, URL_HOSTS_SETTING, NO_URL_HOSTS))
    return default if found is None else found


@pass_context
def personalize_script(context: Context, nonce: str | None = None) -> Markup:
    """``{{ personalize_script(nonce=csp_nonce) }}``: the tracking script tag (put it once
    in the base layout; empty when tracking is off), and where the request's developer
    tools are on, the preview banner and the debug overlay."""
    handle = _handle_from(context)
    if handle is None or (handle.tracking is None and handle.devtools is None):
        return _EMPTY
    request = context.resolve_or_missing("request")
    root_path = request.scope.get("root_path", "") if isinstance(request, Request) else ""
    tags = (
        _EMPTY
        if handle.tracking is None
        else handle.tracking.script_tag(nonce, root_path=root_path, page=handle)
    )
    if handle.devtools is not None:
        tags += handle.devtools.page_markup(handle, nonce, root_path=root_path)
    return tags


# -- URLs ------------------------------------------------------------------------------------


def url_hosts(hosts: Iterable[str]) -> frozenset[str]:
    """``hosts`` normalised for ``checked_url``: ``"shop.example.com"`` (that host, any
    port), ``"*.example.com"`` (its subdomains, not itself), ``"*"`` (any host). Case and a
    trailing dot do not matter; a scheme, path, port or non-ASCII name is a
    ``ConfigurationError`` (write an international name in its ``xn--`` form)."""
    if isinstance(hosts, _URLHosts):
        return hosts
    if isinstance(hosts, str):
        raise ConfigurationError(
            "allowed_url_hosts must be a list of host names, not one string",
            field="allowed_url_hosts",
        )
    normalised: list[str] = []
    for host in hosts:
        entry = host.strip().lower() if isinstance(host, str) else ""
        wildcard = "*." if entry.startswith("*.") else ""
        name = entry.removeprefix(wildcard)
        name = name[:-1] if name.endswith(".") else name  # the root's dot: the same host
        if entry != "*" and not (name.isascii() and _HOST_RE.fullmatch(name)):
            raise ConfigurationError(
                f"allowed_url_hosts: {host!r} is not a host name (write 'shop.example.com' "
                "or '*.example.com': no scheme, port or path)",
                field="allowed_url_hosts",
            )
        normalised.append(entry if entry == "*" else wildcard + name)
    return _URLHosts(normalised)


def set_allowed_url_hosts(env: Environment, hosts: Iterable[str]) -> None:
    """Let ``url`` / ``personalize_url`` / ``safe_url`` in ``env``'s templates hand out
    absolute ``http(s)`` URLs on ``hosts`` (see ``url_hosts`` for the forms); stored on the
    environment as ``personalize_allowed_url_hosts``. Without it only paths on this site
    (``/...``) pass."""
    setattr(env, URL_HOSTS_SETTING, url_hosts(hosts))


def checked_url(value: object, allowed_hosts: frozenset[str] = NO_URL_HOSTS) -> str | None:
    """``value`` (ASCII whitespace around it removed) when it is safe as a link or resource
    URL, else ``None``. Safe means one of:

    - a path on this site: starts with ``/``, and its second character is none of ``/``
      (``//host`` is another site) and ``&`` (where autoescaping is off, ``/&#47;host``
      or ``/&sol;host`` decodes to ``//host`` in an attribute);
    - ``http://`` or ``https://`` (any case), a host in ``allowed_hosts`` (exact, or under
      a ``*.`` wildcard, or ``*``), an optional numeric port, no ``user@`` part.

    and, anywhere: printable characters only (no control, format or whitespace
    characters: browsers drop tabs and newlines, so ``java\tscript:`` IS ``javascript:``),
    no quote, angle bracket, backtick or backslash, at most ``MAX_URL_LENGTH`` characters.
    Everything else is refused: other schemes (``javascript:``, ``data:``, ``vbscript:``)
    in any case or spelling, ``https:host``, relative paths, ``?``/``#`` alone. HTML
    entities are not decoded here: autoescaping turns ``&`` into ``&amp;``, so an entity in
    a value reaches the browser as text; and with autoescaping off the rules above
    still hold once entities are decoded (scheme and host allow no ``&``).
    """
    if not isinstance(value, str):
        return None
    url = value.strip(" \t\n\r\f")
    if (
        not url
        or len(url) > MAX_URL_LENGTH
        or not url.isprintable()  # controls, format characters, separators but " "
        or " " in url
        or not _URL_REFUSED_CHARS.isdisjoint(url)
    ):
        return None
    if url[0] == "/":
        return url if len(url) == 1 or url[1] not in "/&" else None
    lowered = url[:8].lower()
    scheme = next((s for s in _URL_SCHEMES if lowered.startswith(s)), None)
    if scheme is None:
        return None
    rest = url[len(scheme) :]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    host, _, port = authority.partition(":")
    host = host.lower()
    host = host[:-1] if host.endswith(".") else host  # the root's dot: the same host
    if "@" in authority or not _PORT_RE.fullmatch(port) or not _HOST_RE.fullmatch(host):
        return None
    return url if _host_allowed(host, allowed_hosts) else None


def _host_allowed(host: str, allowed: frozenset[str]) -> bool:
    if host in allowed or "*" in allowed:
        return True
    parts = host.split(".")
    return any("*." + ".".join(parts[i:]) in allowed for i in range(1, len(parts)))
