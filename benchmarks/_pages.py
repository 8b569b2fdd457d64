"""The pages every benchmark renders, generated for a size: N experiences, H tracking hooks.

A page is the shop layout (``templates/_layout.html``: nav, 8 products, footer) with N
content blocks. Each block reads 3 values (a title, a discount, a call to action) and
has ``links`` call-to-action links; the page's H hooks go one impression per block first
(blocks in order), then click hooks on the blocks' links. So 3 experiences x 6 hooks is
the issue's page: 3 blocks, 9 value reads, 3 impressions + 3 clicks, and the script.

Each size has two sources, written out block by block as a person would write them (no
loop or ``if`` the other variant lacks):

- ``plain_template``: the page before personalization, reading ``values[key]`` (a dict
  per block from the handler: the defaults, GrowthBook's features, or the hand-written
  floor's per-user values) and, when the handler gives one, a page-view token;
- ``tag_template``: the ``{% experience %}`` tag per block with typed reads
  (``exp.string`` / ``exp.number``), the defaults in its ``else``, the hooks, and
  ``personalize_script()`` when the page has hooks;
- ``direct_template``: the page reading ``request.state.personalize`` itself
  (``pz.value``), no tag, no hooks.

The plain page "of the same size" as a tag page has the same blocks and links, so the
ratio between them is what personalization adds, not markup.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from starlette.templating import Jinja2Templates

from personalize_middleware import setup_templates

__all__ = [
    "KEYS",
    "LOADER",
    "NAV",
    "PERSONALIZED_TEMPLATES",
    "PLAIN_TEMPLATES",
    "PRODUCTS",
    "Page",
    "default_values",
    "experience_keys",
]

#: The first three experiences keep the names the rest of the benchmarks check for.
KEYS: tuple[str, ...] = ("home-hero", "home-promo", "home-sidebar")
_TITLES = {"home-hero": "Welcome", "home-promo": "Free shipping", "home-sidebar": "New in"}
MAX_EXPERIENCES = 25  # the API's keys per call
NAV = [{"href": f"/c/{i}", "label": f"Category {i}"} for i in range(6)]
PRODUCTS = [{"id": i, "name": f"Product {i}", "price": f"{9 + i}.99"} for i in range(8)]


def experience_keys(count: int) -> tuple[str, ...]:
    if not 1 <= count <= MAX_EXPERIENCES:
        raise ValueError(f"1 to {MAX_EXPERIENCES} experiences, not {count}")
    extra = tuple(f"home-block-{i:02d}" for i in range(len(KEYS), count))
    return (KEYS + extra)[:count]


def _defaults(key: str) -> dict[str, Any]:
    return {"title": _TITLES.get(key, f"Block {key[-2:]}"), "cta": "Shop now", "discount": 10}


def default_values(count: int) -> dict[str, dict[str, Any]]:
    """Per key, the block's default values (what the plain page renders)."""
    return {key: _defaults(key) for key in experience_keys(count)}


@dataclass(frozen=True)
class Page:
    """A page size: ``experiences`` blocks, ``hooks`` tracking hooks spread over them."""

    experiences: int = 3
    hooks: int = 6

    def __post_init__(self) -> None:
        experience_keys(self.experiences)  # validates the count
        if self.hooks < 0:
            raise ValueError(f"hooks must be >= 0, not {self.hooks}")

    @property
    def keys(self) -> tuple[str, ...]:
        return experience_keys(self.experiences)

    def hooks_of(self, block: int) -> int:
        n = self.experiences
        return self.hooks // n + (1 if block < self.hooks % n else 0)

    @property
    def links(self) -> int:
        """Links per block: enough for the most click hooks any block has, at least 1."""
        return max(1, max(self.hooks_of(i) - 1 for i in range(self.experiences)))

    @property
    def value_reads(self) -> int:
        return 3 * self.experiences

    @property
    def plain_name(self) -> str:
        return f"plain-{self.experiences}x{self.links}.html"

    @property
    def tag_name(self) -> str:
        return f"tag-{self.experiences}-{self.hooks}.html"

    @property
    def direct_name(self) -> str:
        return f"direct-{self.experiences}x{self.links}.html"

    def describe(self) -> str:
        return (
            f"{self.experiences} experiences, {self.value_reads} value reads, "
            f"{self.hooks} hooks" + (" + script" if self.hooks else "")
        )

    # -- sources --------------------------------------------------------------------------

    def _anchor(self, key: str, link: int) -> str:
        return f'<a href="/offers/{key}/{link}"'

    @cached_property
    def plain_source(self) -> str:
        out = ['{% extends "_layout.html" %}', "{% block blocks %}"]
        for key in self.keys:
            out += [
                f'    {{%- set b = values["{key}"] %}}',
                '    <section class="block">',
                '      <h2>{{ b["title"] }}</h2>',
                '      <p class="offer">{{ b["discount"] }}% off</p>',
                '      {%- set cta = b["cta"] %}',
            ]
            out += [f"      {self._anchor(key, j)}>{{{{ cta }}}}</a>" for j in range(self.links)]
            out.append("    </section>")
        out += [
            "{% endblock %}",
            "{% block scripts %}{% if page_token %}"
            '<script>window.pageView = "{{ page_token }}";</script>'
            "{% endif %}{% endblock %}",
        ]
        return "\n".join(out)

    @cached_property
    def tag_source(self) -> str:
        out = ['{% extends "_layout.html" %}', "{% block blocks %}"]
        for i, key in enumerate(self.keys):
            d = _defaults(key)
            hooks = self.hooks_of(i)
            seen = "{{ impression(exp) }}" if hooks else ""
            out += [
                f'    {{%- experience "{key}" as exp %}}',
                f'    <section class="block"{seen}>',
                f'      <h2>{{{{ exp.string("title", "{d["title"]}") }}}}</h2>',
                '      <p class="offer">'
                f'{{{{ exp.number("discount", {d["discount"]}) }}}}% off</p>',
                f'      {{%- set cta = exp.string("cta", "{d["cta"]}") %}}',
            ]
            for j in range(self.links):
                click = f'{{{{ track_click(exp, "cta-{j}") }}}}' if j < hooks - 1 else ""
                out.append(f"      {self._anchor(key, j)}{click}>{{{{ cta }}}}</a>")
            out += [
                "    </section>",
                "    {%- else %}",
                '    <section class="block">',
                f"      <h2>{d['title']}</h2>",
                f'      <p class="offer">{d["discount"]}% off</p>',
            ]
            out += [f"      {self._anchor(key, j)}>{d['cta']}</a>" for j in range(self.links)]
            out += ["    </section>", "    {%- endexperience %}"]
        out.append("{% endblock %}")
        if self.hooks:
            out.append("{% block scripts %}{{ personalize_script() }}{% endblock %}")
        return "\n".join(out)

    @cached_property
    def direct_source(self) -> str:
        out = [
            '{% extends "_layout.html" %}',
            "{% block blocks %}",
            "    {%- set pz = request.state.personalize %}",
        ]
        for key in self.keys:
            d = _defaults(key)
            out += [
                '    <section class="block">',
                f'      <h2>{{{{ pz.value("{key}", "title", "{d["title"]}") }}}}</h2>',
                f'      <p class="offer">{{{{ pz.value("{key}", "discount", {d["discount"]}) }}}}'
                "% off</p>",
                f'      {{%- set cta = pz.value("{key}", "cta", "{d["cta"]}") %}}',
            ]
            out += [f"      {self._anchor(key, j)}>{{{{ cta }}}}</a>" for j in range(self.links)]
            out.append("    </section>")
        out.append("{% endblock %}")
        return "\n".join(out)


class _PageLoader(jinja2.BaseLoader):
    """``_layout.html`` from ``templates/``, every other name generated from its ``Page``."""

    def __init__(self) -> None:
        self._files = jinja2.FileSystemLoader(str(Path(__file__).with_name("templates")))
        self._generated: dict[str, str] = {}

    def add(self, page: Page) -> None:
        self._generated[page.plain_name] = page.plain_source
        self._generated[page.tag_name] = page.tag_source
        self._generated[page.direct_name] = page.direct_source

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Any]:
        if template in self._generated:
            return self._generated[template], None, lambda: True
        return self._files.get_source(environment, template)


LOADER = _PageLoader()


def _templates() -> Jinja2Templates:
    return Jinja2Templates(env=jinja2.Environment(loader=LOADER, autoescape=True))


#: What the app had before personalization: plain Starlette templates.
PLAIN_TEMPLATES = _templates()
#: The same templates with ``setup_templates``: the tag, the hooks, the waiting response.
PERSONALIZED_TEMPLATES = _templates()
setup_templates(PERSONALIZED_TEMPLATES)
