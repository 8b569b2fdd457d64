"""Reads and hooks inside ``{% experience %}`` compiled to direct calls (``jinja/_direct``).

Every template renders twice: in a stock environment, where the tag's body is rewritten,
and in ``AsWritten``, an environment Jinja treats the same way but the rewrite leaves
alone (it overrides ``getattr``, with the same behaviour), so its body compiles to
Jinja's own ``context.call``. Output, errors and the template line of an error must be
the same; the compiled code must hold no ``context.call`` for the rewritten calls.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import jinja2
import jinja2.runtime
import pytest
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEnvironment,
    SecurityError,
    unsafe,
)

from personalize_middleware import (
    ExperienceStore,
    Identity,
    Personalization,
    TemplateExperience,
    TemplateUsageError,
    setup_jinja,
)
from personalize_middleware._signing import Keyring
from personalize_middleware.jinja._direct import direct_calls_apply, rewrite_calls
from personalize_middleware.tracking import Tracking
from tests.support.tracking_helpers import StaticBackend

KEYRING = Keyring(["jinja-direct-test-secret-0123456789"])
EXPERIENCES: dict[str, dict[str, Any]] = {
    "hero": {
        "Title": "Summer sale",
        "Discount": ("15", "number"),
        "Show": ("true", "boolean"),
        "Config": ('{"a": {"b": 1}, "cta": {"label": "Buy"}, "items": ["x", "y"]}', "json"),
        "Link": "/summer",
        "Bad": "javascript:alert(1)",
        "Next": "promo",
    },
    "promo": {"Title": "Free shipping", "Discount": ("5", "number")},
}
MACROS = "{% macro impression(e) %}[imported {{ e.key }}]{% endmacro %}"


class AsWritten(jinja2.Environment):
    """Stock Jinja, but ``getattr`` is overridden (to the same thing): the rewrite keeps
    out, so templates compile to the calls Jinja writes. The reference."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        return super().getattr(obj, attribute)


def make_env(
    cls: type[jinja2.Environment] = jinja2.Environment, *, is_async: bool = False, **pages: str
) -> jinja2.Environment:
    env = cls(
        loader=jinja2.DictLoader({"macros": MACROS, **pages}),
        autoescape=True,
        enable_async=is_async,
        undefined=jinja2.StrictUndefined,
    )
    setup_jinja(env)
    return env


async def make_handle() -> Personalization:
    backend = StaticBackend(EXPERIENCES)

    async def identity() -> Identity:
        return Identity(customer_id="alice")

    handle = Personalization(
        store=ExperienceStore(backend),
        keys=tuple(EXPERIENCES),
        attributes={},
        budget=2.0,
        identity_factory=identity,
        tracking=Tracking(keyring=KEYRING, backend=backend),
    )
    await handle.start()
    await handle.wait()
    return handle


async def render(env: jinja2.Environment, source: str, **ctx: Any) -> str:
    template = env.from_string(source)
    if env.is_async:
        return await template.render_async(**ctx)
    return template.render(**ctx)


async def outcome(env: jinja2.Environment, source: str, **ctx: Any) -> tuple[str, str, int]:
    """``("ok", output, 0)``, or the error's type, message and template line."""
    try:
        return "ok", await render(env, source, **ctx), 0
    except Exception as exc:
        lines = [
            f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"
        ]
        return type(exc).__name__, str(exc), lines[-1] if lines else 0


async def same_as_written(source: str, *, is_async: bool, **ctx: Any) -> tuple[str, str, int]:
    """What ``source`` renders (or raises) with the rewrite, checked equal to without it."""
    ctx.setdefault("personalize", await make_handle())
    direct_env = make_env(is_async=is_async)
    reference_env = make_env(AsWritten, is_async=is_async)
    assert direct_calls_apply(direct_env) and not direct_calls_apply(reference_env)
    direct = await outcome(direct_env, source, **ctx)
    assert direct == await outcome(reference_env, source, **ctx)
    return direct


def tag(body: str, default: str = "") -> str:
    return '{% experience "hero" as exp %}' + body + "{% else %}" + default + "{% endexperience %}"


def compiled(
    source: str, *, is_async: bool = False, cls: type[jinja2.Environment] = jinja2.Environment
) -> str:
    return str(make_env(cls, is_async=is_async).compile(source, raw=True))


both = pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])


# -- what the tag compiles to ------------------------------------------------------------------


EVERY_DIRECT_CALL = tag(
    '<s{{ impression(exp) }}>{{ exp.get("Title") }}{{ exp.string("Title", default="x") }}'
    '{{ exp.number(*["Discount", 1]) }}{{ exp.boolean("Show", **{"default": True}) }}'
    '{{ exp.url("Link", "/") }}{{ exp.json("Config", "a.b") | string | upper }}'
    '{% set t = exp.string("Title") %}{% if exp.boolean("Show") %}{{ t }}{% endif %}'
    '{% for i in [1, 2] %}<a{{ track_click(exp, "b" ~ i) }}>{{ exp.get("Title") }}</a>{% endfor %}'
    '{{ personalize_value("hero", "Title") }}{{ personalize_url("hero", "Link") }}'
    '{{ personalize_experience("promo").string("Title") }}'
    '{% experience exp.string("Next") as inner %}{{ inner.number("Discount") }}'
    "{{ impression(inner) }}{% endexperience %}",
    default='{{ track_click(exp, "b") }}{{ exp.get("Title") if exp else "none" }}',
)


@both
def test_reads_and_hooks_compile_to_filters_not_context_call(is_async: bool) -> None:
    code = compiled(EVERY_DIRECT_CALL, is_async=is_async)
    assert (
        "context.call(" not in code and "_personalize_read" in code and "_personalize_call" in code
    )
    # Without the rewrite (the reference), the same template is all context.call.
    assert (
        compiled(EVERY_DIRECT_CALL, is_async=is_async, cls=AsWritten).count("context.call(") == 20
    )


@both
@pytest.mark.anyio
async def test_every_direct_call_renders_as_written(is_async: bool) -> None:
    kind, out, _ = await same_as_written(EVERY_DIRECT_CALL, is_async=is_async)
    assert (kind, re.sub(r'(data-pz-\w+)="[^"]+"', r"\1", out)) == (
        "ok",
        "<s data-pz-impression>Summer saleSummer sale15True/summer1Summer sale"
        "<a data-pz-click>Summer sale</a><a data-pz-click>Summer sale</a>"
        "Summer sale/summerFree shipping5 data-pz-impression",
    )


@pytest.mark.parametrize(
    "source",
    [
        tag("{{ range(2) | list }}"),  # not a helper
        tag("{{ exp.payload.items() | list }}"),  # not a reader
        tag("{% for i in [1] %}{{ loop.cycle('a') }}{% endfor %}"),
        tag("{% macro m() %}m{% endmacro %}{{ m() }}"),
        tag("{% macro m() %}{{ caller() }}{% endmacro %}{% call m() %}c{% endcall %}"),
        "{{ impression(x) }}{{ x.string('a') }}",  # outside the tag: left as written
    ],
)
def test_other_calls_stay_jinja_calls(source: str) -> None:
    assert "context.call(" in compiled(source)


def test_rewriting_twice_changes_nothing() -> None:
    env = make_env()
    tree = env.parse(EVERY_DIRECT_CALL)
    once = env.compile(tree, raw=True)
    rewrite_calls(tree.body, env)
    assert env.compile(tree, raw=True) == once


def test_sandboxed_and_overriding_environments_are_left_as_written() -> None:
    for cls in (SandboxedEnvironment, ImmutableSandboxedEnvironment, AsWritten):
        code = compiled(EVERY_DIRECT_CALL, cls=cls)
        assert "_personalize_read" not in code.split("def root", 1)[1]
        assert "_personalize_call" not in code.split("def root", 1)[1]

    class Traced(jinja2.runtime.Context):
        def call(__self, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            return super().call(__obj, *args, **kwargs)

    env = make_env()
    env.context_class = Traced
    assert not direct_calls_apply(env)
    assert "context.call(" in str(env.compile(EVERY_DIRECT_CALL, raw=True))


# -- the same output and errors as Jinja's calls ---------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('exp.string("Title", "Welcome")', "Summer sale"),
        ('exp.string("Nope", "Welcome")', "Welcome"),
        ('exp.string("Title", default="x")', "Summer sale"),
        ('exp.string("Nope", default="x")', "x"),
        ('exp.string("Discount")', "15"),
        ('exp.string(name="Nope")', ""),
        ('exp.number("Discount", 10)', "15"),
        ('exp.number("Nope", 10)', "10"),
        ('exp.number("Title", default=7)', "7"),
        ('exp.boolean("Show")', "True"),
        ('exp.boolean("Nope", default=True)', "True"),
        ('exp.get("Title")', "Summer sale"),
        ('exp.get("Nope")', "None"),
        ('exp.get("Nope", "dflt")', "dflt"),
        ('exp.json("Config", "a.b")', "1"),
        ('exp.json("Config", "cta.label")', "Buy"),
        ('exp.json("Config", "items.1")', "y"),
        ('exp.json("Config", path="items.9", default="none")', "none"),
        ('exp.json("Title", default="nojson")', "nojson"),
        ('exp.json("Config", "cta") | tojson', '{"label": "Buy"}'),
        ('exp.url("Link", "/sale")', "/summer"),
        ('exp.url("Bad", "/sale")', "/sale"),
        ('exp.url("Nope")', ""),
        ("exp.string(*args)", "Summer sale"),
        ('exp.string("Nope", **kwargs)', "kw"),
        ('exp.string(*args[:1], **{"default": "d"})', "Summer sale"),
        ('exp.string("Title") | upper', "SUMMER SALE"),
        ('exp.get("Title") ~ exp.string("Nope", "!")', "Summer sale!"),
        ('personalize_value("hero", "Title", "d")', "Summer sale"),
        ('personalize_url("hero", "Bad", "/safe")', "/safe"),
        ('personalize_experience("promo").number("Discount")', "5"),
        ('personalize_experience("nope") is none', "True"),
    ],
)
@both
@pytest.mark.anyio
async def test_reads_render_what_jinjas_calls_render(
    is_async: bool, expression: str, expected: str
) -> None:
    ctx = {"args": ["Title", "dflt"], "kwargs": {"default": "kw"}}
    source = tag("{{ " + expression + " }}")
    assert await same_as_written(source, is_async=is_async, **ctx) == ("ok", expected, 0)


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ("\n\n{{ impression(42) }}", "TemplateUsageError", "impression() takes an experience"),
        ('\n\n{{ track_click(exp, "") }}', "TemplateUsageError", "b_id"),
        ('\n\n{{ track_click(exp, "x" * 200) }}', "TemplateUsageError", "b_id"),
        ('\n\n{{ personalize_value(42, "Title") }}', "TemplateUsageError", "non-empty string"),
        ("\n\n{{ impression() }}", "TypeError", "missing 1 required positional argument"),
        ("\n\n{{ impression(exp, fn=1) }}", "TypeError", "unexpected keyword argument 'fn'"),
        ("\n\n{{ exp.string() }}", "TypeError", "missing 1 required positional argument"),
        ('\n\n{{ exp.string("a", attr=1) }}', "TypeError", "unexpected keyword argument 'attr'"),
        ('\n\n{{ exp.json("Config", "a", "b", "c") }}', "TypeError", "positional arguments"),
        ('\n\n{{ exp.string(*["a", "b"], default="c") }}', "TypeError", "multiple values"),
        ('\n\n{{ nothing.string("a") }}', "UndefinedError", "'nothing' is undefined"),
        ('\n\n{{ exp.string2("a") }}', "UndefinedError", "has no attribute 'string2'"),
    ],
)
@both
@pytest.mark.anyio
async def test_misuse_raises_the_same_error_on_the_same_line(
    is_async: bool, body: str, error: str, message: str
) -> None:
    kind, text, line = await same_as_written(tag(body), is_async=is_async)
    assert (kind, line) == (error, 3) and message in text


@both
@pytest.mark.anyio
async def test_reads_in_the_else_branch_fail_as_before(is_async: bool) -> None:
    source = '{% experience "nope" as exp %}{% else %}\n{{ exp.string("T") }}{% endexperience %}'
    kind, text, line = await same_as_written(source, is_async=is_async)
    assert (kind, line) == ("UndefinedError", 2) and "'None' has no attribute 'string'" in text
    hooks = '{% experience "nope" as exp %}{% else %}<b{{ impression(exp) }}>{% endexperience %}'
    assert await same_as_written(hooks, is_async=is_async) == ("ok", "<b>", 0)


# -- names the template rebinds ------------------------------------------------------------------


class Stranger:
    """Not an experience, but with methods of the readers' names."""

    def string(self, name: str, default: str = "") -> str:
        return f"stranger:{name}:{default}"

    @property
    def get(self) -> Callable[[str], str]:
        return lambda name: f"property:{name}"


class Special(TemplateExperience):
    """A subclass overriding a reader: the direct call must not bypass the override."""

    def string(self, name: str, default: str = "") -> str:
        return "special:" + super().string(name, default)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{% set exp = {"Title": "T"} %}{{ exp.get("Title", "d") }}', "T"),
        ('{% set exp = {"string": "not callable"} %}{{ exp.string("a") }}', None),
        ('{% set exp = {"string": upper} %}{{ exp.string("a") }}', "A"),
        ('{% for exp in [{"Title": "L"}] %}{{ exp.get("Title") }}{% endfor %}', "L"),
        (
            '{% with exp = stranger %}{{ exp.string("a", "b") }}|{{ exp.get("c") }}{% endwith %}',
            "stranger:a:b|property:c",
        ),
        ('{% set exp = special %}{{ exp.string("Title") }}', "special:Summer sale"),
        ('{% set exp = none %}{{ exp.string("Title") }}', None),
        ('{% set exp = undefined_name %}{{ exp.string("Title") }}', None),
        (
            "{% macro impression(e) %}[macro {{ e.key }}]{% endmacro %}{{ impression(exp) }}",
            "[macro hero]",
        ),
        ('{% from "macros" import impression %}{{ impression(exp) }}', "[imported hero]"),
        ("{% set impression = upper %}{{ impression(exp.key) }}", "HERO"),
        (
            '{% set impression = personalize_value %}{{ impression("hero", "Title") }}',
            "Summer sale",
        ),
        ("{% set impression = 3 %}{{ impression(exp) }}", None),
        ("{{ track_click(exp) }}", "tracked hero"),  # a render variable of that name
    ],
)
@both
@pytest.mark.anyio
async def test_rebound_names_behave_as_before(
    is_async: bool, body: str, expected: str | None
) -> None:
    handle = await make_handle()
    experience = handle.experience("hero")
    assert experience is not None
    ctx = {
        "personalize": handle,
        "upper": str.upper,
        "stranger": Stranger(),
        "special": Special(experience),
        "track_click": lambda e: f"tracked {e.key}",
    }
    kind, out, _ = await same_as_written(tag(body), is_async=is_async, **ctx)
    if expected is None:
        assert kind != "ok"
    else:
        assert (kind, out) == ("ok", expected)


@pytest.mark.anyio
async def test_an_awaitable_attribute_is_awaited_before_the_call_in_async() -> None:
    class Lazy:
        @property
        def get(self) -> Awaitable[Callable[[str], str]]:
            async def method() -> Callable[[str], str]:
                return lambda name: f"awaited {name}"

            return method()

    source = tag('{% set exp = lazy %}{{ exp.get("x") }}')
    assert await same_as_written(source, is_async=True, lazy=Lazy()) == ("ok", "awaited x", 0)


# -- blocks inside the tag --------------------------------------------------------------------


@both
@pytest.mark.anyio
async def test_call_blocks_macros_and_nested_tags_inside_the_tag(is_async: bool) -> None:
    source = (
        "{% macro card(e, title) %}<div{{ impression(e) }}>{{ title }}:{{ caller('!') }}</div>"
        "{% endmacro %}"
        + tag(
            "{% macro line(name) %}<i>{{ exp.string(name, '-') }}</i>{% endmacro %}"
            '{% call(mark) card(exp, exp.string("Title")) %}{{ exp.number("Discount") }}{{ mark }}'
            '<b{{ track_click(exp, "b") }}></b>{% endcall %}{{ line("Title") }}{{ line("Nope") }}'
            '{% experience exp.string("Next") as inner %}[{{ inner.string("Title") }}|'
            '{{ exp.number("Discount") }}]{% else %}[none]{% endexperience %}'
        )
    )
    code = compiled(source, is_async=is_async)
    # The {% call %} and the macro calls stay Jinja calls; the reads inside them do not.
    # card(...), line(...) x 2; in card (outside the tag): caller(...), impression(e).
    assert code.count("context.call(") == 5
    kind, out, _ = await same_as_written(source, is_async=is_async)
    assert (kind, re.sub(r'(data-pz-\w+)="[^"]+"', r"\1", out)) == (
        "ok",
        "<div data-pz-impression>Summer sale:15!<b data-pz-click></b></div>"
        "<i>Summer sale</i><i>-</i>[Free shipping|15]",
    )


# -- sandboxes -------------------------------------------------------------------------------------


class Guarded:
    @unsafe
    def string(self, name: str) -> str:  # pragma: no cover - the sandbox refuses the call
        return "ran " + name


@both
@pytest.mark.anyio
async def test_sandbox_renders_the_tag_and_keeps_refusing(is_async: bool) -> None:
    handle = await make_handle()
    env = make_env(SandboxedEnvironment, is_async=is_async)
    plain = make_env(is_async=is_async)
    body = '<s{{ impression(exp) }}>{{ exp.string("Title") }}{{ exp.number("Discount") }}</s>'
    assert await render(env, tag(body), personalize=handle) == await render(
        plain, tag(body), personalize=handle
    )
    refused = [
        tag('{% set exp = guarded %}{{ exp.string("a") }}'),
        tag("{{ exp.__class__() }}"),
        # The filters are reachable by name: they check as the sandbox does.
        '{{ guarded | _personalize_read("string", "a") }}',
        '{{ guarded | _personalize_read("__class__") }}',
        "{{ guarded.string | _personalize_call('a') }}",
    ]
    for source in refused:
        with pytest.raises(SecurityError):
            await render(env, source, personalize=handle, guarded=Guarded())
    immutable = make_env(ImmutableSandboxedEnvironment, is_async=is_async)
    with pytest.raises(SecurityError):
        await render(immutable, '{{ items | _personalize_read("append", 1) }}', items=[])


# -- the point of it all ---------------------------------------------------------------------------


@pytest.fixture
def context_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every callable ``jinja2.runtime.Context.call`` is asked to call, in order."""
    seen: list[Any] = []
    original = jinja2.runtime.Context.call

    def counting(self: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        seen.append(obj)
        return original(self, obj, *args, **kwargs)

    monkeypatch.setattr(jinja2.runtime.Context, "call", counting)
    yield seen


FULL_TAG = tag(
    '<section{{ impression(exp) }}><h2>{{ exp.string("Title", "Welcome") }}</h2>'
    '<p>{{ exp.number("Discount", 10) }}% off</p>{% set cta = exp.get("Cta", "Shop now") %}'
    '<a{{ track_click(exp, "cta-0") }}>{{ cta }}</a></section>',
    default="<section><h2>Welcome</h2><p>10% off</p><a>Shop now</a></section>",
)


@both
@pytest.mark.anyio
async def test_a_full_tag_makes_no_context_call(is_async: bool, context_calls: list[Any]) -> None:
    handle = await make_handle()
    out = await render(make_env(is_async=is_async), FULL_TAG, personalize=handle)
    assert "<h2>Summer sale</h2><p>15% off</p>" in out and " data-pz-click=" in out
    assert context_calls == []
    # The reference makes one per read and hook: the counter counts.
    reference = await render(make_env(AsWritten, is_async=is_async), FULL_TAG, personalize=handle)
    assert reference == out and len(context_calls) == 5


@pytest.mark.anyio
async def test_a_rebound_hook_goes_through_context_call(context_calls: list[Any]) -> None:
    source = "{% macro impression(e) %}[{{ e.key }}]{% endmacro %}" + FULL_TAG
    out = await render(make_env(), source, personalize=await make_handle())
    assert "<section[hero]>" in out
    assert [type(c).__name__ for c in context_calls] == ["Macro"]


def test_impression_42_is_still_a_template_usage_error() -> None:
    with pytest.raises(TemplateUsageError, match="impression"):
        make_env().from_string(tag("", default="{{ impression(42) }}")).render()
