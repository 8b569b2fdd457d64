"""The Jinja tag, value helpers and hooks in sync and async environments, compile-time
errors, escaping, and ``PersonalizeTemplates`` / ``setup_templates`` through the middleware."""

from __future__ import annotations

import ast
import asyncio
import html
import inspect
import re
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.testclient import TestClient

import personalize_middleware.jinja
from personalize_middleware import (
    Experience,
    ExperienceStore,
    Identity,
    InvalidTokenError,
    Personalization,
    PersonalizeMiddleware,
    TemplateUsageError,
    current_personalization,
)
from personalize_middleware._signing import Keyring
from personalize_middleware.jinja import (
    PersonalizedTemplateResponse,
    PersonalizeTemplates,
    setup_jinja,
    setup_templates,
)
from personalize_middleware.tracking import Tracking
from tests.support.tracking_helpers import (
    StaticBackend,
    context_for,
    hook_values,
    page_manifest,
    read_hooks,
)

KEYRING = Keyring(["jinja-test-secret-0123456789"])
ALICE = Identity(customer_id="alice")
BOB = Identity(customer_id="bob")
XSS_TEXT = "<script>alert(1)</script>"
XSS_ATTR = '" onmouseover="alert(1)'

EXPERIENCES: dict[str, dict[str, Any]] = {
    "hero": {
        "Title": "Summer sale",
        "Discount": ("15", "number"),
        "Ratio": ("0.5", "float"),
        "Show": ("true", "boolean"),
        "Config": ('{"cta": {"label": "Buy"}, "items": ["a", "b"]}', "json"),
        "Broken": ("lots", "number"),
    },
    "xss": {"Title": XSS_TEXT, "Subtitle": XSS_ATTR, "Config": (f'{{"x": "{XSS_TEXT}"}}', "json")},
    "late": {"Title": "Fetched on demand"},
}

HERO = """\
{% experience "hero" as hero %}<h1{{ impression(hero) }}>{{ hero.Title }}</h1>\
<button{{ track_click(hero, "Add to Cart") }}>Add</button>\
{% else %}<h1>Default</h1>{% endexperience %}"""


class SlowBackend(StaticBackend):
    def __init__(self, experiences: Mapping[str, Mapping[str, Any]], delay: float) -> None:
        super().__init__(experiences)
        self.delay = delay

    async def fetch_experiences(self, keys: Iterable[str], **kwargs: Any) -> dict[str, Experience]:
        await asyncio.sleep(self.delay)
        return await super().fetch_experiences(keys, **kwargs)


def make_env(*, is_async: bool = False, **templates: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.DictLoader(templates),
        autoescape=jinja2.select_autoescape(default_for_string=True, default=True),
        enable_async=is_async,
        undefined=jinja2.StrictUndefined,
    )
    setup_jinja(env)
    return env


async def make_handle(
    keys: tuple[str, ...] = ("hero", "xss"),
    *,
    backend: StaticBackend | None = None,
    tracking: bool = True,
    wait: bool = True,
) -> Personalization:
    backend = backend or StaticBackend(EXPERIENCES)

    async def identity() -> Identity:
        return ALICE

    handle = Personalization(
        store=ExperienceStore(backend),
        keys=keys,
        attributes={},
        budget=2.0,
        identity_factory=identity,
        tracking=Tracking(keyring=KEYRING, backend=backend) if tracking else None,
    )
    await handle.start()
    if wait:
        await handle.wait()
    return handle


async def render(source: str, handle: Personalization | None, *, is_async: bool, **ctx: Any) -> str:
    env = make_env(is_async=is_async, page=source)
    template = env.get_template("page")
    if handle is not None:
        ctx.setdefault("personalize", handle)
    if is_async:
        return await template.render_async(**ctx)
    return template.render(**ctx)


def tokens(output: str, attr: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(rf' {attr}="([^"]*)"', output)]


both = pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])


# -- the tag -------------------------------------------------------------------------------


@both
@pytest.mark.anyio
async def test_tag_renders_the_experience_or_the_default(is_async: bool) -> None:
    handle = await make_handle()
    out = await render(HERO, handle, is_async=is_async)
    assert "<h1 data-pz-impression=" in out and ">Summer sale</h1>" in out
    assert "Default" not in out
    missing = HERO.replace('"hero"', '"unknown-key"')
    out = await render(missing, handle, is_async=is_async)
    assert out == "<h1>Default</h1>"
    # Without an else branch nothing is rendered for a miss.
    out = await render(
        '{% experience "nope" as x %}X{% endexperience %}!', handle, is_async=is_async
    )
    assert out == "!"


@both
@pytest.mark.anyio
async def test_nested_if_else_and_scoping(is_async: bool) -> None:
    source = """\
{% experience "hero" as hero %}{% if hero.boolean("Show") %}shown{% else %}hidden{% endif %}\
{% else %}default{% endexperience %}|{{ hero is defined }}"""
    out = await render(source, await make_handle(), is_async=is_async)
    assert out == "shown|False"  # the name does not leak out of the block


@both
@pytest.mark.anyio
async def test_tag_in_a_loop_keeps_outer_names_and_matches_empty_payloads(is_async: bool) -> None:
    """Keys from a loop variable, an outer variable of the same name kept, and an
    experience with no payload variables still a match (its body, not the default)."""
    backend = StaticBackend({**EXPERIENCES, "empty": {}})
    handle = await make_handle(("hero", "empty", "xss"), backend=backend)
    source = """\
{% set e = "outer" %}{% for k in ["hero", "nope", "empty"] %}\
{% experience k as e %}[{{ k }}:{{ e.get("Title", "-") }}]{% else %}[{{ k }}:default]\
{% endexperience %}{% endfor %}|{{ e }}"""
    out = await render(source, handle, is_async=is_async)
    assert out == "[hero:Summer sale][nope:default][empty:-]|outer"


@both
@pytest.mark.anyio
async def test_typed_values_with_defaults(is_async: bool) -> None:
    source = """\
{% experience "hero" as hero %}\
{{ hero.Title }}|{{ hero["Title"] }}|{{ hero.get("Nope", "Welcome") }}|\
{{ hero.number("Discount") + 1 }}|{{ hero.number("Broken", 5) }}|{{ hero.number("Title", 7) }}|\
{{ hero.get("Ratio") * 2 }}|{{ hero.boolean("Show") }}|{{ hero.boolean("Title", False) }}|\
{{ hero.json("Config", "cta.label") }}|{{ hero.json("Config", "items.1") }}|\
{{ hero.json("Config", "items.9", "none") }}|{{ hero.json("Title", default="nojson") }}|\
{{ hero.string("Discount") }}|{{ hero.string("Nope", "dflt") }}|{{ "Title" in hero }}|\
{{ hero.key }}|{{ hero.variation_id }}\
{% endexperience %}"""
    out = await render(source, await make_handle(), is_async=is_async)
    assert out.split("|") == [
        "Summer sale", "Summer sale", "Welcome", "16", "5", "7", "1.0", "True", "False",
        "Buy", "b", "none", "nojson", "15", "dflt", "True", "hero", "2",
    ]  # fmt: skip


@both
@pytest.mark.anyio
async def test_missing_payload_variable_is_undefined(is_async: bool) -> None:
    source = '{% experience "hero" as hero %}{{ hero.Nope }}{% endexperience %}'
    with pytest.raises(jinja2.UndefinedError):
        await render(source, await make_handle(), is_async=is_async)


@both
@pytest.mark.anyio
async def test_value_and_experience_globals(is_async: bool) -> None:
    source = """\
{{ personalize_value("hero", "Title", "Welcome") }}|\
{{ personalize_value("none", "Title", "Welcome") }}|\
{% set promo = personalize_experience("hero") %}{{ promo.number("Discount") }}|\
{{ personalize_experience("none") is none }}"""
    out = await render(source, await make_handle(), is_async=is_async)
    assert out == "Summer sale|Welcome|15|True"


@both
@pytest.mark.anyio
async def test_without_a_handle_everything_is_default(is_async: bool) -> None:
    source = HERO + '|{{ personalize_value("hero", "Title", "W") }}|{{ personalize_script() }}|'
    assert await render(source, None, is_async=is_async) == "<h1>Default</h1>|W||"


@pytest.mark.anyio
async def test_handle_from_the_context_variable() -> None:
    """A plain environment finds the middleware's handle through the ContextVar."""
    handle = await make_handle()
    token = current_personalization.set(handle)
    try:
        out = await render(HERO, None, is_async=False)
    finally:
        current_personalization.reset(token)
    assert ">Summer sale</h1>" in out


@pytest.mark.anyio
async def test_async_env_fetches_keys_the_route_did_not_ask_for() -> None:
    backend = StaticBackend(EXPERIENCES)
    handle = await make_handle(("hero",), backend=backend)
    source = '{% experience "late" as late %}{{ late.Title }}{% else %}default{% endexperience %}'
    assert await render(source, handle, is_async=True) == "Fetched on demand"
    assert backend.fetches == [["hero"], ["late"]]
    # A sync environment cannot wait: an undeclared key renders the default.
    other = await make_handle(("hero",))
    assert await render(source.replace("late", "xss"), other, is_async=False) == "default"


# -- hooks ---------------------------------------------------------------------------------


@both
@pytest.mark.anyio
async def test_hooks_carry_signed_tokens_for_this_page_view(is_async: bool) -> None:
    """A page whose manifest will be written (``open_manifest``: what
    ``PersonalizeTemplates`` does) gets indexes before its script and tokens after it;
    any other render, tokens. All verify for this visitor as what they were rendered for,
    and for no other visitor."""
    body = """\
{% experience "hero" as hero %}<div{{ hero | impression }}>\
<button{{ track_click(hero, "Add to Cart") }}>A</button>\
<button{{ hero | track_click("Wishlist") }}>W</button></div>{% endexperience %}"""
    script = "{{ personalize_script() }}"
    for source, managed, indexed in (
        (body + script, True, True),
        (script + body, True, False),  # the script in <head>: nothing lists later hooks
        (body + script, False, False),  # a bare environment: nobody writes a manifest
    ):
        handle = await make_handle()
        if managed:
            assert handle.tracking is not None
            handle.tracking.open_manifest(handle)
        out = await render(source, handle, is_async=is_async)
        assert [("~" in v) for v in hook_values(out)] == [indexed] * 3
        assert (page_manifest(out) is not None) is indexed
        (impression,) = read_hooks(KEYRING, ALICE, out, "impression")
        assert (impression.kind, impression.key, impression.b_id) == ("shown", "hero", None)
        assert impression.render_id == handle.render_id
        assert impression.context == context_for("hero")
        b_ids = [t.b_id for t in read_hooks(KEYRING, ALICE, out, "click")]
        assert b_ids == ["Add to Cart", "Wishlist"]
        assert "alice" not in out
        with pytest.raises(InvalidTokenError):  # another visitor's page
            read_hooks(KEYRING, BOB, out)


@both
@pytest.mark.anyio
async def test_hooks_are_empty_for_defaults_and_without_tracking(is_async: bool) -> None:
    source = """\
{% experience "nope" as x %}{% else %}<div{{ impression(x) }}>\
<b{{ track_click(x, "Add to Cart") }}></b></div>{% endexperience %}"""
    assert await render(source, await make_handle(), is_async=is_async) == "<div><b></b></div>"
    untracked = await make_handle(tracking=False)
    assert await render(HERO, untracked, is_async=is_async) == (
        "<h1>Summer sale</h1><button>Add</button>"
    )


@pytest.mark.parametrize("b_id", ["", "x" * 129, "line\nbreak", "\x07", 3, None])
@both
@pytest.mark.anyio
async def test_bad_b_id_is_a_template_error(is_async: bool, b_id: object) -> None:
    source = '{% experience "hero" as hero %}<b{{ track_click(hero, b) }}></b>{% endexperience %}'
    with pytest.raises(TemplateUsageError, match="b_id"):
        await render(source, await make_handle(), is_async=is_async, b=b_id)
    # Even in the default branch: the mistake must not wait for a match to show up.
    default = '{% experience "nope" as x %}{% else %}{{ track_click(x, b) }}{% endexperience %}'
    with pytest.raises(TemplateUsageError, match="b_id"):
        await render(default, await make_handle(), is_async=is_async, b=b_id)


@pytest.mark.anyio
async def test_hook_given_something_else_is_a_template_error() -> None:
    with pytest.raises(TemplateUsageError, match="impression"):
        await render('{{ impression("hero") }}', await make_handle(), is_async=False)


@pytest.mark.anyio
async def test_script_tag_with_nonce_and_root_path() -> None:
    handle = await make_handle()
    assert handle.tracking is not None
    out = await render("{{ personalize_script(nonce=n) }}", handle, is_async=False, n='a"b')
    path = handle.tracking.script_path
    assert out == (
        f'<script defer src="{path}" integrity="{handle.tracking.script_hash}" '
        'data-pz-endpoint="/_personalize/events" nonce="a&#34;b"></script>'
    )


def test_script_tag_per_root_path_and_nonce() -> None:
    """The tag is built once per root path; a nonce never sticks to the cached tag; paths
    are escaped; odd root paths cannot grow the cache without bound."""
    tracking = Tracking(keyring=KEYRING, backend=StaticBackend({}))
    plain = tracking.script_tag()
    assert plain == tracking.script_tag() and "nonce" not in plain
    with_nonce = tracking.script_tag("n-1")
    assert with_nonce == str(plain).replace("></script>", ' nonce="n-1"></script>')
    assert "nonce" not in tracking.script_tag()
    mounted = tracking.script_tag(root_path='/shop"<x>')
    assert 'src="/shop&#34;&lt;x&gt;/_personalize/personalize.' in mounted
    assert 'data-pz-endpoint="/shop&#34;&lt;x&gt;/_personalize/events"' in mounted
    for i in range(1000):
        assert f'src="/p{i}/_personalize/' in tracking.script_tag(root_path=f"/p{i}")
    assert len(tracking._script_tags) <= 256
    assert tracking.script_tag() == plain


# -- compile-time errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        ("\n\n{% experience 42 as hero %}{% endexperience %}", 3, "must be a string, got 42"),
        ('{% experience ["a"] as h %}{% endexperience %}', 1, "must be a string, got 'list'"),
        ("\n{% experience none as h %}{% endexperience %}", 2, "must be a string, got None"),
        ('{% experience "a" hero %}{% endexperience %}', 1, "expected 'as NAME'"),
        ('{% experience "a" %}{% endexperience %}', 1, "expected 'as NAME'"),
        ('\n{% experience "a" as hero wait=1 %}{% endexperience %}', 2, "unexpected 'wait'"),
        ('{% experience "a" as hero.x %}{% endexperience %}', 1, "unexpected '.'"),
        (
            '{% experience "a" as 3 %}{% endexperience %}',
            1,
            "expected a variable name after 'as', got 'integer'",
        ),
        ('x\n{% experience "a" as hero %}never closed', 2, "endexperience"),
    ],
)
@both
def test_template_mistakes_fail_at_compile_time(
    is_async: bool, source: str, line: int, message: str
) -> None:
    env = make_env(is_async=is_async)
    with pytest.raises(jinja2.TemplateSyntaxError) as info:
        env.from_string(source)
    assert info.value.lineno == line
    assert message in str(info.value)


@pytest.mark.anyio
async def test_non_string_key_from_a_variable_is_a_template_error() -> None:
    source = "{% experience key as hero %}x{% endexperience %}"
    with pytest.raises(TemplateUsageError, match="key"):
        await render(source, await make_handle(), is_async=False, key=42)


# -- escaping ------------------------------------------------------------------------------


@both
@pytest.mark.anyio
async def test_payload_values_are_escaped_in_text_and_attributes(is_async: bool) -> None:
    source = """\
{% experience "xss" as x %}<p title="{{ x.Subtitle }}" data-x='{{ x.Title }}'\
{{ impression(x) }}>{{ x.Title }}{{ x.get("Subtitle") }}{{ x.json("Config", "x") }}\
{{ personalize_value("xss", "Title") }}</p>{% endexperience %}"""
    out = await render(source, await make_handle(), is_async=is_async)
    assert "<script>" not in out and 'onmouseover="' not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert 'title="&#34; onmouseover=&#34;alert(1)"' in out
    assert "'" not in out.split("data-x=")[1][1:].split("'")[0]  # single quotes escaped too


def test_setup_jinja_warns_when_autoescape_is_off(caplog: pytest.LogCaptureFixture) -> None:
    setup_jinja(jinja2.Environment(autoescape=False))
    assert "does not autoescape" in caplog.text


def test_extension_keeps_no_state_and_settings_live_on_the_env() -> None:
    env = make_env()
    (extension,) = env.extensions.values()
    assert vars(extension) == {"environment": env}
    assert env.personalize_context_name == "personalize"  # type: ignore[attr-defined]
    overlay = env.overlay()
    assert overlay.from_string('{% experience "a" as a %}{% endexperience %}').render() == ""


# -- PersonalizeTemplates / setup_templates through the middleware -------------------------

PAGE = """\
{% experience "hero" as hero %}<h1{{ impression(hero) }}>{{ hero.Title }}</h1>\
{% else %}<h1>Default</h1>{% endexperience %}{{ personalize_script() }}"""


def user_identity(conn: HTTPConnection) -> Identity | None:
    return ALICE


def subclassed(env: jinja2.Environment) -> Jinja2Templates:
    return PersonalizeTemplates(env=env)


def set_up(env: jinja2.Environment) -> Jinja2Templates:
    templates = Jinja2Templates(env=env)
    setup_templates(templates)
    setup_templates(templates)  # idempotent
    return templates


MakeTemplates = Callable[[jinja2.Environment], Jinja2Templates]
both_ways = pytest.mark.parametrize(
    "make_templates", [subclassed, set_up], ids=["PersonalizeTemplates", "setup_templates"]
)


def page_env(*, is_async: bool = False) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.DictLoader({"page.html": PAGE, "plain.html": "plain {{ 1 + 1 }}"}),
        autoescape=jinja2.select_autoescape(),
        enable_async=is_async,
    )


def templated_app(
    backend: StaticBackend,
    *,
    is_async: bool = False,
    budget: float = 2.0,
    make_templates: MakeTemplates = set_up,
) -> Any:
    templates = make_templates(page_env(is_async=is_async))
    kinds: list[str] = []

    async def page(request: Request) -> Response:
        response = templates.TemplateResponse(request, "page.html", {"extra": 1})
        kinds.append(type(response).__name__)
        return response

    async def plain(request: Request) -> Response:
        response = templates.TemplateResponse(request, "plain.html")
        kinds.append(type(response).__name__)
        return response

    app = Starlette(
        routes=[Route("/", page), Route("/plain", plain)],
        middleware=[
            Middleware(
                PersonalizeMiddleware,
                backend=backend,
                routes={"/": ["hero"]},
                identify=user_identity,
                secret_key="templates-secret-0123456789",
                latency_budget=budget,
                metadata_refresh=None,
            )
        ],
    )
    return app, kinds


@both_ways
def test_template_response_waits_for_a_pending_fetch(make_templates: MakeTemplates) -> None:
    app, kinds = templated_app(SlowBackend(EXPERIENCES, delay=0.2), make_templates=make_templates)
    with TestClient(app) as client:
        response = client.get("/")
        assert response.status_code == 200
        assert ">Summer sale</h1>" in response.text
        assert int(response.headers["content-length"]) == len(response.content)
        assert "data-pz-impression=" in response.text and "<script defer src=" in response.text
        assert response.template.name == "page.html"  # type: ignore[attr-defined]
        assert response.context["extra"] == 1  # type: ignore[attr-defined]
        assert isinstance(response.context["personalize"], Personalization)  # type: ignore[attr-defined]
        # The second request is a cache hit: nothing pending, Starlette renders at once.
        again = client.get("/")
        assert ">Summer sale</h1>" in again.text
        assert again.template.name == "page.html"  # type: ignore[attr-defined]
    assert kinds == ["PersonalizedTemplateResponse", "_TemplateResponse"]


@both_ways
def test_template_response_renders_the_default_when_the_budget_runs_out(
    make_templates: MakeTemplates,
) -> None:
    app, kinds = templated_app(
        SlowBackend(EXPERIENCES, delay=1.0), budget=0.2, make_templates=make_templates
    )
    with TestClient(app) as client:
        started = time.monotonic()
        response = client.get("/")
        elapsed = time.monotonic() - started
    assert "<h1>Default</h1>" in response.text
    assert elapsed < 0.8
    assert kinds == ["PersonalizedTemplateResponse"]


@both_ways
@pytest.mark.parametrize("path", ["/", "/plain"])
def test_async_environment_renders_with_render_async(
    path: str, make_templates: MakeTemplates
) -> None:
    app, kinds = templated_app(
        StaticBackend(EXPERIENCES), is_async=True, make_templates=make_templates
    )
    with TestClient(app) as client:
        response = client.get(path)
    assert response.status_code == 200
    assert ">Summer sale</h1>" in response.text if path == "/" else response.text == "plain 2"
    assert kinds == ["PersonalizedTemplateResponse"]


@pytest.mark.anyio
async def test_personalized_response_renders_once() -> None:
    handle = await make_handle()
    env = make_env(page=HERO)
    response = PersonalizedTemplateResponse(env.get_template("page"), {}, handle=handle)
    assert response.body == b""
    await response.render_template()
    body = response.body
    await response.render_template()
    assert response.body is body
    assert response.headers["content-length"] == str(len(body))


def test_pending_response_keeps_status_headers_and_background() -> None:
    """What the handler passes to TemplateResponse reaches the waiting response too."""
    templates = PersonalizeTemplates(env=page_env())
    ran: list[str] = []

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(
            request=request,
            name="page.html",
            context={"extra": 1},
            status_code=418,
            headers={"x-page": "tea"},
            background=BackgroundTask(ran.append, "done"),
        )

    app = Starlette(
        routes=[Route("/", page)],
        middleware=[
            Middleware(
                PersonalizeMiddleware,
                backend=SlowBackend(EXPERIENCES, delay=0.1),
                routes={"/": ["hero"]},
                identify=user_identity,
                secret_key="templates-secret-0123456789",
                metadata_refresh=None,
            )
        ],
    )
    with TestClient(app) as client:
        response = client.get("/")
    assert response.status_code == 418
    assert response.headers["x-page"] == "tea"
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert int(response.headers["content-length"]) == len(response.content)
    assert ">Summer sale</h1>" in response.text
    assert ran == ["done"]


# -- PersonalizeTemplates without the middleware, signature, setup_templates ----------------


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_personalize_templates_from_a_directory_without_the_middleware(
    tmp_path: Path, is_async: bool
) -> None:
    """No middleware, no handle: the defaults render, in sync and async environments."""
    (tmp_path / "page.html").write_text(PAGE)
    templates = PersonalizeTemplates(directory=tmp_path)
    if is_async:
        templates = PersonalizeTemplates(
            env=jinja2.Environment(
                loader=jinja2.FileSystemLoader(tmp_path),
                autoescape=jinja2.select_autoescape(),
                enable_async=True,
            )
        )

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html", {"extra": 1})

    with TestClient(Starlette(routes=[Route("/", page)])) as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.text == "<h1>Default</h1>"
    assert response.template.name == "page.html"  # type: ignore[attr-defined]
    assert response.context["extra"] == 1  # type: ignore[attr-defined]
    assert "personalize" not in response.context  # type: ignore[attr-defined]
    assert templates.env.autoescape is not False  # Starlette's select_autoescape()


def test_template_response_signature_is_starlettes() -> None:
    """``TemplateResponse(request, name, context, ...)``: the same parameters, in the same
    order, with the same defaults as ``Jinja2Templates.TemplateResponse``."""
    ours = inspect.signature(PersonalizeTemplates.TemplateResponse).parameters
    starlettes = Jinja2Templates.TemplateResponse
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(starlettes).parameters.values()):
        # Starlette before 1.0: (*args, **kwargs), with this signature as its first overload
        starlettes = typing.get_overloads(starlettes)[0]
    theirs = inspect.signature(starlettes).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]
    assert list(ours)[:4] == ["self", "request", "name", "context"]


def test_personalize_templates_installs_once_and_keeps_context_processors() -> None:
    def site(request: Request) -> dict[str, Any]:
        return {"site": "shop"}

    templates = PersonalizeTemplates(env=page_env(), context_processors=[site])
    assert templates.context_processors[0] is site
    assert len(templates.context_processors) == 2
    setup_templates(templates)  # already personalized: nothing added
    assert len(templates.context_processors) == 2
    assert type(templates) is PersonalizeTemplates
    assert "impression" in templates.env.globals and "url_for" in templates.env.globals
    with pytest.raises(AssertionError):
        PersonalizeTemplates()  # type: ignore[call-overload]


def test_setup_templates_makes_a_plain_instance_personalized() -> None:
    templates = Jinja2Templates(env=page_env())
    setup_templates(templates)
    assert type(templates) is PersonalizeTemplates
    assert "experience" in next(iter(templates.env.extensions.values())).tags


def test_setup_templates_keeps_an_apps_own_subclass() -> None:
    """A Jinja2Templates subclass of the app keeps its methods; ours run first."""

    class ShopTemplates(Jinja2Templates):
        def get_template(self, name: str) -> jinja2.Template:
            return super().get_template("plain.html" if name == "old.html" else name)

    first, second = ShopTemplates(env=page_env()), ShopTemplates(env=page_env())
    setup_templates(first)
    setup_templates(second)
    assert isinstance(first, PersonalizeTemplates) and isinstance(first, ShopTemplates)
    assert type(first) is type(second)  # one class per app class, not one per call
    assert type(first).__name__ == "ShopTemplates"

    async def page(request: Request) -> Response:
        return first.TemplateResponse(request, "old.html")

    with TestClient(Starlette(routes=[Route("/", page)])) as client:
        assert client.get("/").text == "plain 2"


def test_the_jinja_package_uses_no_private_starlette_name() -> None:
    """Regression: setup_templates used to copy Starlette's private _TemplateResponse code."""
    package = Path(personalize_middleware.jinja.__file__).parent
    for module in package.glob("*.py"):
        tree = ast.parse(module.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("starlette"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module.name} imports {private} from {node.module}"
        assert "_TemplateResponse" not in module.read_text(), module.name


def test_jinja_package_exports() -> None:
    exported = personalize_middleware.jinja.__all__
    assert exported == sorted(exported)
    assert {
        "PersonalizeExtension",
        "PersonalizeTemplates",
        "PersonalizedTemplateResponse",
        "TemplateExperience",
        "set_allowed_url_hosts",
        "lint_templates",
        "setup_jinja",
        "setup_templates",
    } <= set(exported)
