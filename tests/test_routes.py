"""Route patterns: Starlette's semantics exactly, in time linear in the path.

Regression: ``/a/{p:path}/b/{q:path}/c`` was matched with Starlette's backtracking regex,
so a crafted 10 KB path took ~0.5-0.7 s on the event loop and every request queued behind
it waited. Speed is never asserted in absolute terms here; linearity is, twice: the
Python-level work of a match does not grow with the path, and a path 64 times longer
costs far less than 64 x 64 times more (a backtracking matcher is thousands of times off).
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.convertors import CONVERTOR_TYPES, Convertor
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, compile_path

import personalize_middleware._routes as routes_module
from personalize_middleware import ConfigurationError, PersonalizeMiddleware
from personalize_middleware._routes import MAX_MATCHED_PATH_BYTES, RouteKeys
from tests.support.fake_backend import FakeBackend

KIB = 1024
UUID = "123e4567-e89b-12d3-a456-426614174000"


def matches(pattern: str, path: str) -> bool:
    return RouteKeys({pattern: ["k"]}).keys_for(path) == ("k",)


def starlette_matches(pattern: str, path: str) -> bool:
    regex, _, _ = compile_path(pattern)
    return regex.match(path) is not None


# -- the same answers as Starlette ------------------------------------------------------

#: Whether the installed Starlette's uuid convertor takes dashless / upper-case uuids.
NEW_UUIDS = "-?" in CONVERTOR_TYPES["uuid"].regex


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/", "/", True),
        ("/", "/x", False),
        ("/products/{id}", "/products/42", True),
        ("/products/{id}", "/products/", False),
        ("/products/{id}", "/products/4/2", False),
        ("/products/{id}", "/products/é€", True),
        ("/shop/{rest:path}", "/shop/", True),
        ("/shop/{rest:path}", "/shop/a/b/c", True),
        ("/shop/{rest:path}", "/shop", False),
        ("/u/{id:int}", "/u/12", True),
        ("/u/{id:int}", "/u/12a", False),
        ("/u/{id:int}", "/u/١٢", False),  # [0-9] is ASCII only
        ("/v/{x:float}", "/v/1.5", True),
        ("/v/{x:float}", "/v/1", True),
        ("/v/{x:float}", "/v/1.", False),
        ("/v/{x:float}", "/v/.5", False),
        ("/o/{id:uuid}", f"/o/{UUID}", True),
        ("/o/{id:uuid}", f"/o/{UUID.replace('-', '')}", NEW_UUIDS),
        ("/o/{id:uuid}", f"/o/{UUID[:-1]}", False),
        ("/o/{id:uuid}", f"/o/{UUID.upper()}", NEW_UUIDS),
        ("/files/{name}.{ext}", "/files/a.b.c", True),
        ("/files/{name}.{ext}", "/files/abc", False),
        ("/{a}{b}", "/é", False),  # two parameters need two characters, not two bytes
        ("/{a}{b}", "/éé", True),
        ("/docs/{p:path}.html", "/docs/a/b.html", True),
        ("/a/{p:path}/b/{q:path}/c", "/a//b//c", True),
        ("/a/{p:path}/b/{q:path}/c", "/a/b/c", False),
        # Starlette's quirks, kept: ``.*`` stops at a newline, ``[^/]+`` does not, and
        # ``$`` also matches before one trailing newline.
        ("/shop/{rest:path}", "/shop/a\nb", False),
        ("/products/{id}", "/products/a\nb", True),
        ("/products/{id}", "/products/1\n", True),
        ("/about", "/about\n", True),
        ("/about", "/about\n\n", False),
        ("/{x}/", "/a/\n", True),
        ("/{1x}/{x}", "/{1x}/y", True),  # not a parameter name: literal text
    ],
)
def test_matches_like_starlette(pattern: str, path: str, expected: bool) -> None:
    # (NEW_UUIDS: Starlette's uuid convertor takes dashless and upper-case uuids only in
    # its newer releases; .ci/floors runs these tests on the oldest supported one.)
    assert starlette_matches(pattern, path) is expected
    assert matches(pattern, path) is expected


_PARAM_FORMS = ("{%s}", "{%s:str}", "{%s:int}", "{%s:float}", "{%s:uuid}", "{%s:path}")
_LITERALS = ("/", "/", "a", "b", ".", "-", "1", "é", "€", "\n", "/a/", "x.", "{", "}", "{1}")
_VALUES = ("a", "1", "12", "1.5", UUID, UUID.replace("-", ""), "a/b", "é", "", "\n", "b.c")
_PATH_PIECES = ("/", "/", "a", "b", "f", ".", "-", "0", "1", "2", "é", "€", "\n", "\ud800")


@st.composite
def patterns(draw: st.DrawFn) -> str:
    parts = ["/"]
    for i in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            parts.append(draw(st.sampled_from(_PARAM_FORMS)) % f"p{i}")
        else:
            parts.append(draw(st.sampled_from(_LITERALS)))
    return "".join(parts)


@st.composite
def paths_for(draw: st.DrawFn, pattern: str) -> str:
    """A path near the pattern (its parameters filled in) or a path from the alphabet."""
    if draw(st.booleans()):
        fill = st.sampled_from(_VALUES)
        return re.sub(r"\{[a-z0-9]+(:[a-z]+)?\}", lambda _: draw(fill), pattern)
    pieces = st.sampled_from((*_PATH_PIECES, UUID, "/a/", "x.", "1.5"))
    return "/" + "".join(draw(st.lists(pieces, max_size=12)))


DIFFERENTIAL = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(params=["translated masks", "bit-plane masks"])
def mask_strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    # Past a few masks, single bytes are combined from bit planes: check both ways.
    if request.param == "bit-plane masks":
        monkeypatch.setattr(routes_module, "_TRANSLATED_BYTE_MASKS", 0)


@pytest.mark.usefixtures("mask_strategy")
@DIFFERENTIAL
@given(data=st.data())
def test_agrees_with_starlettes_regex_on_generated_patterns_and_paths(data: st.DataObject) -> None:
    pattern = data.draw(patterns())
    routes = RouteKeys({pattern: ["k"]})
    regex, _, _ = compile_path(pattern)
    for _ in range(8):
        path = data.draw(paths_for(pattern))
        expected = regex.match(path) is not None
        assert (routes.keys_for(path) == ("k",)) is expected, (pattern, path)


@pytest.mark.usefixtures("mask_strategy")
def test_long_paths_agree_with_starlettes_regex() -> None:
    # Long enough for many machine words (and for the regex to still answer quickly).
    filler = "ab/é€.1-" * 300
    cases = [
        ("/{a}/x/{b:path}", f"/q/x/{filler}"),
        ("/{a:path}.html", f"/{filler}.html"),
        ("/{a:path}/{n:int}", f"/{filler}/{'7' * 500}"),
        ("/{a:path}/{n:float}x", f"/{filler}/{'7' * 500}.{'5' * 500}x"),
        ("/{a:path}/{u:uuid}", f"/{filler}/{UUID}"),
        ("/{a}", "/" + "é" * 3000),
        ("/{a}/{b}", "/" + "é" * 3000),
    ]
    for pattern, path in cases:
        for candidate in (path, path + "\n", path[:-1], "/" + path[2:]):
            assert matches(pattern, candidate) is starlette_matches(pattern, candidate), (
                pattern,
                candidate[-40:],
            )


# -- configuration ------------------------------------------------------------------------


class SlugConvertor(Convertor[str]):
    regex = "[a-z-]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class DigitsConvertor(SlugConvertor):
    regex = "[0-9]+"


def test_an_unsupported_custom_convertor_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(CONVERTOR_TYPES, "slug", SlugConvertor())
    with pytest.raises(ConfigurationError, match="'slug' is not supported"):
        RouteKeys({"/posts/{s:slug}": ["k"]})


def test_a_custom_convertor_with_a_builtin_regex_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CONVERTOR_TYPES, "digits", DigitsConvertor())
    routes = RouteKeys({"/posts/{n:digits}": ["k"]})
    assert routes.keys_for("/posts/12") == ("k",)
    assert routes.keys_for("/posts/1a") == ()


@pytest.mark.parametrize("pattern", ["/{x:nope}", "/{x}/{x}"])
def test_an_invalid_pattern_is_a_configuration_error(pattern: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid pattern"):
        RouteKeys({pattern: ["k"]})


def test_site_keys_and_every_matching_route_in_order() -> None:
    routes = RouteKeys(
        {"/shop/{rest:path}": ["a", "b"], "/shop/{id:int}": ["b", "c"], "/x": ["d"]},
        site_keys=["s"],
    )
    assert routes.keys_for("/shop/12") == ("s", "a", "b", "c")
    assert routes.keys_for("/shop/x") == ("s", "a", "b")
    assert routes.keys_for("/nowhere") == ("s",)


# -- bounds: path length and the memo ------------------------------------------------------


def test_paths_longer_than_the_cap_get_the_site_keys_only() -> None:
    routes = RouteKeys({"/{rest:path}": ["k"]}, site_keys=["s"])
    at_cap = "/" + "a" * (MAX_MATCHED_PATH_BYTES - 1)
    assert routes.keys_for(at_cap) == ("s", "k")
    assert routes.keys_for(at_cap + "a") == ("s",)


def test_the_cap_counts_utf8_bytes() -> None:
    routes = RouteKeys({"/{rest:path}": ["k"]})
    two_byte_chars = "/" + "é" * (MAX_MATCHED_PATH_BYTES // 2)  # cap + 1 bytes
    assert len(two_byte_chars) < MAX_MATCHED_PATH_BYTES
    assert routes.keys_for(two_byte_chars) == ()
    assert routes.keys_for(two_byte_chars[:-1]) == ("k",)


def test_the_memo_stays_bounded_in_entries_and_in_bytes() -> None:
    routes = RouteKeys({"/p/{id}": ["k"]})
    for i in range(routes_module._PATH_CACHE_SIZE + 100):
        assert routes.keys_for(f"/p/{i}") == ("k",)
    assert len(routes._cache) <= routes_module._PATH_CACHE_SIZE
    long_path = "/p/" + "x" * 2000
    assert routes.keys_for(long_path) == ("k",)
    assert long_path not in routes._cache
    assert max(map(len, routes._cache)) <= routes_module._MEMO_MAX_PATH


# -- linear time (regression: ReDoS in route matching) ------------------------------------

# (pattern, a path of about ``size`` bytes built to make a backtracking matcher explore
# every split; all but the path as reported pass the literal prefix and suffix checks, so
# the automaton runs on them)
Adversary = tuple[str, Callable[[int], str]]
ADVERSARIES: dict[str, Adversary] = {
    "reported: two path params": (
        "/a/{p:path}/b/{q:path}/c",
        lambda size: "/a/" + "/b/" * (size // 3) + "\n/c",
    ),
    "reported, as sent (no suffix)": (
        "/a/{p:path}/b/{q:path}/c",
        lambda size: "/a/" + "/b/" * (size // 3),
    ),
    "five path params": (
        "/{a:path}/{b:path}/{c:path}/{d:path}/{e:path}/z",
        lambda size: "/" + "x/" * (size // 2) + "\n/z",
    ),
    "many params in one segment": (
        "/{a}.{b}.{c}.{d}.{e}/{f:float}.{g:int}x{h:uuid}{i}/{rest:path}",
        lambda size: "/" + "a." * (size // 2) + "/1.1.1x",
    ),
    "str runs then a literal": (
        "/{a}{b}{c}{d}{e}{f}{g}{h}x",
        lambda size: "/" + "é" * (size // 2) + "/x",
    ),
    "path then digits": (
        "/{p:path}/{n:int}.{m:float}{u:uuid}",
        lambda size: "/" + "1/1." * (size // 4) + "1" * 40,
    ),
}


def _fastest_seconds(function: Callable[[], object], runs: int = 20, batch: int = 5) -> float:
    """The fastest of ``runs`` batches, per call: a busy machine only ever adds time."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(batch):
            function()
        samples.append((time.perf_counter() - started) / batch)
    return min(samples)


def _python_lines_run(function: Callable[[], object]) -> int:
    """Python lines of ``_routes`` executed by ``function``: what is left is C-level work
    on whole position sets (translate, int, shift, and, add), linear in the path."""
    lines = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if frame.f_code.co_filename == routes_module.__file__:
            lines += event == "line"
            return tracer
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        function()
    finally:
        sys.settrace(previous)
    return lines


@pytest.mark.parametrize("name", list(ADVERSARIES))
def test_python_level_work_does_not_grow_with_the_path(name: str) -> None:
    pattern, build = ADVERSARIES[name]
    routes = RouteKeys({pattern: ["k"]})
    short, long = build(1 * KIB), build(MAX_MATCHED_PATH_BYTES - 64)
    assert len(long.encode()) <= MAX_MATCHED_PATH_BYTES
    assert _python_lines_run(lambda: routes._match(short)) == _python_lines_run(
        lambda: routes._match(long)
    )


@pytest.mark.parametrize("name", list(ADVERSARIES))
def test_a_64_times_longer_path_costs_at_most_200_times_more(name: str) -> None:
    pattern, build = ADVERSARIES[name]
    routes = RouteKeys({pattern: ["k"]})
    # Just under the cap: 64 x 128 bytes, every step of the automaton on long sets.
    small, large = build(128), build(MAX_MATCHED_PATH_BYTES - 64)
    assert len(large.encode()) <= MAX_MATCHED_PATH_BYTES
    assert routes._match(small) == routes._match(large)
    small_cost = _fastest_seconds(lambda: routes._match(small))
    large_cost = _fastest_seconds(lambda: routes._match(large))
    assert large_cost <= 200 * small_cost, (name, small_cost, large_cost)


@pytest.mark.parametrize("name", list(ADVERSARIES))
def test_a_64_kib_path_costs_at_most_200_times_a_1_kib_path(name: str) -> None:
    pattern, build = ADVERSARIES[name]
    routes = RouteKeys({pattern: ["k"]})
    small, large = build(1 * KIB), build(64 * KIB)
    small_cost = _fastest_seconds(lambda: routes._match(small))
    large_cost = _fastest_seconds(lambda: routes._match(large))
    assert large_cost <= 200 * small_cost, (name, small_cost, large_cost)


# -- through the middleware ---------------------------------------------------------------


async def page(request: Request) -> Response:
    await request.state.personalize.wait()
    return PlainTextResponse("ok")


@pytest.mark.anyio
async def test_an_adversarial_path_gets_the_site_keys_and_a_page() -> None:
    backend = FakeBackend()
    personalize = Middleware(
        PersonalizeMiddleware,
        backend=backend,
        routes={"/a/{p:path}/b/{q:path}/c": ["deep"]},
        site_keys=["site"],
        secret_key="test-secret-key-0123456789abcdef",
        tracking=False,
        metadata_refresh=None,
        latency_budget=30.0,
    )
    app = Starlette(routes=[Route("/{rest:path}", page)], middleware=[personalize])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        hostile = await client.get("/a/" + "/b/" * (60 * KIB // 3))
        normal = await client.get(f"/a/{uuid.uuid4()}/b/x/c")
    assert hostile.status_code == normal.status_code == 200
    hostile_call, normal_call = backend.calls  # the second one only asks what is not cached
    assert hostile_call["keys"] == ["site"]
    assert normal_call["keys"] == ["deep"]
