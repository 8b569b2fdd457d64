"""The command line: every command, its output and its error paths (one line, exit 1)."""

from __future__ import annotations

import itertools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from personalize_middleware.cli import main
from personalize_middleware.local import LocalBackend, create_local_server
from tests.support.http_server import run_asgi_server

ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = "CLIWORKSPACE"
SECRET = "cli-secret-value"
_module_ids = itertools.count()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("personalize-middleware: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "MOENGAGE_WORKSPACE_ID",
        "MOENGAGE_API_SECRET",
        "MOENGAGE_BASE_URL",
        "MOENGAGE_DATA_CENTER",
        "MOENGAGE_REDIS_URL",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalBackend]:
    """A real HTTP stand-in for MoEngage, with MOENGAGE_* pointing at it."""
    backend = LocalBackend.default()
    app = create_local_server(backend, workspace_id=WORKSPACE, api_secret=SECRET)
    with run_asgi_server(app) as base:
        monkeypatch.setenv("MOENGAGE_WORKSPACE_ID", WORKSPACE)
        monkeypatch.setenv("MOENGAGE_API_SECRET", SECRET)
        monkeypatch.setenv("MOENGAGE_BASE_URL", base + "/v1")
        yield backend


def yaml_file(tmp_path: Path) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(
        textwrap.dedent(
            """
            experiences:
              - key: promo-strip
                name: Promo strip
                status: Active
                audiences:
                  - name: Everyone
                    variations:
                      - payload:
                          Text: {value: Hello <world>, data_type: string}
                          Count: {value: "7", data_type: number}
              - key: later
                name: Later
                status: Scheduled
                audiences: [{name: All, variations: [{payload: {}}]}]
            """
        ),
        encoding="utf-8",
    )
    return path


# -- general ------------------------------------------------------------------------------


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("serve-local", "experiences", "fetch", "check"):
        assert command in out
    code, _, err = run(capsys)
    assert code == 2
    assert "required" in err
    code, _, err = run(capsys, "nonsense")
    assert code == 2
    assert "invalid choice" in err


# -- experiences --------------------------------------------------------------------------


def test_experiences_lists_the_packaged_sample_without_credentials(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "experiences")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "# 6 experience(s) from local file sample_experiences.json"
    assert lines[1].split() == [
        "email-landing-banner",
        "Active",
        "Email",
        "campaign",
        "landing",
        "banner",
    ]
    assert any(line.split()[:2] == ["cart-upsell", "Paused"] for line in lines)


def test_experiences_status_filter(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "experiences", "--status", "Paused", "Scheduled")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        "cart-upsell",
        "christmas-sale-strip",
    ]
    code, out, _ = run(capsys, "experiences", "--status", "Paused,Scheduled")
    assert out.splitlines()[0].startswith("# 2 experience(s)")


def test_experiences_bad_status_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "experiences", "--status", "active")
    assert code == 1
    assert out == ""
    assert_one_line_error(err, "unknown status 'active'", "case-sensitive")


def test_experiences_from_a_yaml_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = yaml_file(tmp_path)
    code, out, _ = run(capsys, "experiences", "--file", str(path))
    assert code == 0
    assert out.splitlines()[0] == f"# 2 experience(s) from local file {path}"


def test_experiences_bad_file_names_file_experience_and_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "experiences": [
                    {
                        "key": "hero",
                        "name": "Hero",
                        "status": "Active",
                        "audiences": [
                            {
                                "name": "All",
                                "variations": [{"weight": 50, "payload": {}}, {"weight": "x"}],
                            }
                        ],
                    }
                ]
            }
        ),
        encoding="utf-8",
    )
    code, _, err = run(capsys, "experiences", "--file", str(path))
    assert code == 1
    assert_one_line_error(
        err, str(path), "experience 'hero'", "audiences[0].variations[1].weight: must be a number"
    )
    code, _, err = run(capsys, "experiences", "--file", str(tmp_path / "missing.json"))
    assert code == 1
    assert_one_line_error(err, "missing.json: cannot read the file")


def test_experiences_from_the_real_api_when_credentials_are_set(
    capsys: pytest.CaptureFixture[str], api: LocalBackend
) -> None:
    code, out, err = run(capsys, "experiences", "--status", "Active")
    assert code == 0, err
    assert out.splitlines()[0].startswith("# 4 experience(s) from MoEngage API http://127.0.0.1:")
    # --file wins over the environment.
    code, out, _ = run(
        capsys,
        "experiences",
        "--file",
        str(ROOT / "personalize_middleware/local/sample_experiences.json"),
    )
    assert "from local file" in out.splitlines()[0]


def test_experiences_api_auth_failure_is_one_line_without_the_secret(
    capsys: pytest.CaptureFixture[str], api: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOENGAGE_API_SECRET", "a-regenerated-secret")
    code, out, err = run(capsys, "experiences")
    assert code == 1
    assert out == ""
    assert_one_line_error(err)
    assert "401" in err or "uthenticat" in err
    assert "a-regenerated-secret" not in err


def test_experiences_api_unreachable_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.http_server import refused_url

    with refused_url() as base:
        monkeypatch.setenv("MOENGAGE_WORKSPACE_ID", WORKSPACE)
        monkeypatch.setenv("MOENGAGE_API_SECRET", SECRET)
        monkeypatch.setenv("MOENGAGE_BASE_URL", base + "/v1")
        code, _, err = run(capsys, "experiences")
    assert code == 1
    assert_one_line_error(err)


# -- fetch --------------------------------------------------------------------------------


def test_fetch_prints_what_the_user_gets(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "fetch",
        "--customer-id",
        "alice",
        "--attr",
        "utm_medium=email",
        "--attr",
        "DAY_OF_THE_WEEK=Monday",
        "hero-banner",
        "product-upsell",
        "email-landing-banner",
        "cart-upsell",
    )
    assert code == 0, err
    assert out.splitlines()[0].startswith("# alice from local file sample_experiences.json")
    assert "DAY_OF_THE_WEEK=Monday" in out.splitlines()[0]
    assert "TIME_OF_THE_DAY=" in out.splitlines()[0]  # defaulted to now
    assert "hero-banner: variation 3 of 'Homepage hero banner', audience 'Gold members' (5A)" in out
    assert '    title     = "Welcome back — your gold perks are waiting"  [string]' in out
    assert "price            = 49.9  [float]" in out or "price            = 29.0  [float]" in out
    assert "show_badge" in out and "[boolean]" in out
    assert "email-landing-banner: variation 1" in out
    assert "cart-upsell: Paused: every user gets the default until it is Active" in out


def test_regression_fetch_of_an_unknown_key_says_so_and_fails(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's own example fetched ``home-hero``, a key the sample does not have, and
    printed "no experience for this user" with exit status 0."""
    code, out, err = run(capsys, "fetch", "--customer-id", "alice", "home-hero", "hero-banner")
    assert code == 1
    assert "home-hero: unknown key; did you mean 'hero-banner'?" in out
    assert "hero-banner: variation 3" in out  # the known key is still shown
    assert_one_line_error(err, "unknown experience key 'home-hero'", "did you mean 'hero-banner'?")
    code, out, err = run(capsys, "fetch", "--customer-id", "alice", "--json", "zzzzzz")
    assert code == 1 and json.loads(out) == {"experiences": {}}
    assert_one_line_error(err, "'zzzzzz'", "known keys: cart-upsell, christmas-sale-strip")


def test_fetch_tells_no_match_from_an_unknown_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "fetch", "--customer-id", "zed", "email-landing-banner")
    assert code == 0, err
    assert "email-landing-banner: no experience for this user (the default renders)" in out


def test_fetch_json_and_email_identity(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "fetch", "--email", "alice@example.com", "--json", "hero-banner")
    assert code == 0
    data = json.loads(out)
    context = data["experiences"]["hero-banner"]["experience_context"]
    assert context["audience_name"] == "Gold members"  # resolved through u_em


def test_fetch_from_the_real_api(capsys: pytest.CaptureFixture[str], api: LocalBackend) -> None:
    code, out, err = run(capsys, "fetch", "--customer-id", "bob", "product-upsell")
    assert code == 0, err
    assert "from MoEngage API http://127.0.0.1:" in out.splitlines()[0]
    assert "product-upsell: variation" in out


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["fetch", "hero-banner"], ["needs --customer-id or --email"]),
        (["fetch", "--customer-id", "a", "--attr", "novalue", "k"], ["--attr expects NAME=VALUE"]),
        (
            ["fetch", "--customer-id", "a", "--attr", "DAY_OF_THE_WEEK=Funday", "hero-banner"],
            ["DAY_OF_THE_WEEK", "Funday"],
        ),
        (["fetch", "--customer-id", "a", "--file", "/nonexistent/x.json", "k"], ["x.json"]),
    ],
)
def test_fetch_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], needles: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert out == ""
    assert_one_line_error(err, *needles)


def test_fetch_needs_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "fetch", "--customer-id", "a")
    assert code == 2
    assert "KEY" in err


# -- check --------------------------------------------------------------------------------


def test_check_keys_with_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "--keys", "hero-baner", "cart-upsell", "hero-banner")
    assert code == 1
    assert (
        "unknown   hero-baner: no such experience in the workspace; did you mean 'hero-banner'?"
        in out
    )
    assert "paused    cart-upsell: users get the default until it is Active" in out
    assert "ok        hero-banner" in out
    assert out.splitlines()[-1] == "FAILED: 1 unknown, 1 not active"


def test_check_passes_when_every_key_exists_and_strict_fails_on_inactive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "check", "--keys", "hero-banner", "cart-upsell")
    assert code == 0
    assert out.splitlines()[-1] == "OK: 0 unknown, 1 not active"
    code, out, _ = run(capsys, "check", "--strict", "--keys", "hero-banner", "cart-upsell")
    assert code == 1
    code, out, _ = run(capsys, "check", "--keys", "zzzzzz")
    assert "did you mean" not in out


def test_check_keys_file_text_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = tmp_path / "keys.txt"
    text.write_text("# site\nhero-banner\n\nsidebar-promo  # sidebar\n", encoding="utf-8")
    code, out, _ = run(capsys, "check", "--keys-file", str(text))
    assert code == 0
    assert out.splitlines()[0].startswith("# 2 configured key(s)")
    routes = tmp_path / "routes.json"
    routes.write_text(
        json.dumps({"/": ["hero-banner"], "/p/{id}": "produc-upsell"}), encoding="utf-8"
    )
    code, out, _ = run(capsys, "check", "--keys-file", str(routes))
    assert code == 1
    assert "did you mean 'product-upsell'?" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    code, _, err = run(capsys, "check", "--keys-file", str(bad))
    assert code == 1
    assert_one_line_error(err, "bad.json: not valid JSON")
    code, _, err = run(capsys, "check", "--keys-file", str(tmp_path / "none.txt"))
    assert code == 1
    assert_one_line_error(err, "none.txt")


def test_check_against_the_real_api(capsys: pytest.CaptureFixture[str], api: LocalBackend) -> None:
    code, out, _ = run(capsys, "check", "--keys", "hero-banner", "sidebar-promo")
    assert code == 0
    assert "from MoEngage API" in out.splitlines()[0]


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A fresh importable module name in a temporary directory that is the cwd."""
    name = f"cli_app_{next(_module_ids)}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path / f"{name}.py"
    sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "source",
    [
        "KEYS = ['hero-banner', 'hero-baner']",
        "KEYS = {'/': ['hero-banner'], '/x': 'hero-baner'}",
        textwrap.dedent(
            """
            class Config:
                def configured_keys(self):
                    return ('hero-banner', 'hero-baner')
            KEYS = Config()
            """
        ),
        textwrap.dedent(
            """
            class Config:
                configured_keys = ['hero-banner', 'hero-baner']
            KEYS = Config()
            """
        ),
        textwrap.dedent(
            """
            from starlette.applications import Starlette
            from starlette.middleware import Middleware

            class Personalize:
                def __init__(self, app, keys):
                    self.app = app
                    self._keys = keys

                @property
                def configured_keys(self):
                    return tuple(self._keys)

                async def __call__(self, scope, receive, send):
                    await self.app(scope, receive, send)

            KEYS = Starlette(
                middleware=[Middleware(Personalize, keys=['hero-banner', 'hero-baner'])]
            )
            """
        ),
    ],
    ids=["list", "dict", "method", "attribute", "starlette-app"],
)
def test_check_app_accepts_lists_dicts_objects_and_apps(
    capsys: pytest.CaptureFixture[str], app_module: tuple[str, Path], source: str
) -> None:
    name, path = app_module
    path.write_text(source, encoding="utf-8")
    code, out, err = run(capsys, "check", "--app", f"{name}:KEYS")
    assert code == 1, err
    assert out.splitlines()[0].startswith("# 2 configured key(s)")
    assert "did you mean 'hero-banner'?" in out


def test_check_app_with_the_real_middleware(
    capsys: pytest.CaptureFixture[str], app_module: tuple[str, Path]
) -> None:
    name, path = app_module
    path.write_text(
        textwrap.dedent(
            """
            from starlette.applications import Starlette
            from starlette.middleware import Middleware
            from personalize_middleware import PersonalizeMiddleware

            app = Starlette(
                middleware=[
                    Middleware(
                        PersonalizeMiddleware,
                        routes={
                            "/": ["hero-banner", "sidebar-promo"],
                            "/p/{id}": ["product-upsel"],
                        },
                    )
                ]
            )
            """
        ),
        encoding="utf-8",
    )
    code, out, err = run(capsys, "check", "--app", f"{name}:app")
    assert code == 1, err
    assert "did you mean 'product-upsell'?" in out
    assert "ok        hero-banner" in out


@pytest.mark.parametrize(
    ("source", "spec", "needles"),
    [
        ("KEYS = []", "{name}", ["--app expects MODULE:ATTR"]),
        ("KEYS = []", "{name}:NOPE", ["has no attribute 'NOPE'"]),
        ("KEYS = 42", "{name}:KEYS", ["cannot find experience keys in a int"]),
        ("KEYS = ['ok', 3]", "{name}:KEYS", ["non-empty strings, got 3"]),
        ("raise RuntimeError('boom at import')", "{name}:KEYS", ["RuntimeError: boom at import"]),
        ("import not_a_module_anywhere", "{name}:KEYS", ["cannot import"]),
        ("KEYS = []", "missing_module_xyz:KEYS", ["cannot import 'missing_module_xyz'"]),
    ],
)
def test_check_app_errors(
    capsys: pytest.CaptureFixture[str],
    app_module: tuple[str, Path],
    source: str,
    spec: str,
    needles: list[str],
) -> None:
    name, path = app_module
    path.write_text(source, encoding="utf-8")
    code, out, err = run(capsys, "check", "--app", spec.format(name=name))
    assert code == 1
    assert out == ""
    assert_one_line_error(err, *needles)


def test_check_needs_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check")
    assert code == 2
    assert "one of the arguments" in err
    assert "--templates" in err and err.startswith("usage: ")


# -- check --templates ----------------------------------------------------------------------

SAFE_TEMPLATE = """\
{% experience "hero" as hero %}
<a href="{{ hero.url('CtaUrl', '/sale') }}" title="{{ hero.Title }}">{{ hero.CtaLabel }}</a>
<img src="{{ hero.json('Config', 'image') | safe_url('/img/default.png') }}" alt="">
<a href="/products/{{ hero.string('Slug') }}?ref={{ hero.key }}">{{ hero.get('Name') }}</a>
<img src="https://cdn.example.com/{{ hero.string('Img') }}" srcset="{{ hero.url('I2') }} 2x">
<div data-n="{{ hero.number('Count') }}" class="{{ hero.string('Theme') }}"{{ impression(hero) }}>
<button{{ track_click(hero, "Add to Cart") }} onclick="track()">Add</button>
<script>window.hero = {{ hero.json('Config') | tojson }};</script>
<!-- <a href="{{ hero.CtaUrl }}"> is fine in a comment -->
{% endexperience %}
<a href="{{ personalize_url('promo', 'Link', '/') }}">{{ personalize_value('promo', 'Text') }}</a>
<a href="{{ url_for('home') }}">home</a>
{% raw %}<a href="{{ hero.CtaUrl }}">{% endraw %}
"""

# (line, the start of the expected message) for each unsafe spot of UNSAFE_TEMPLATE.
UNSAFE_TEMPLATE = """\
{% experience "hero" as hero %}
<a href="{{ hero.CtaUrl }}">x</a>
<a href="{{ hero.get('CtaUrl', '/') }}" onclick="go('{{ hero.url('CtaUrl') }}')">y</a>
<img src={{ hero.string('Image') }} alt={{ hero.Title }}>
<form action="/{{ hero['Post'] }}"><button formaction="{{ hero.json('C', 'u') }}">z</button>
</form>
<p style="color: {{ hero.string('Color') }}" {{ hero.Attributes }}>w</p>
<script>var title = "{{ hero.Title }}";</script>
{% endexperience %}
{% set promo = personalize_experience("promo") %}
<a href='{% if promo %}{{ promo.Link }}{% endif %}'>v</a>
<iframe srcdoc="{{ personalize_value('promo', 'Html') }}"></iframe>
<a href="{{ personalize_experience('promo')['Link'] }}">u</a>
<style>.promo { color: {{ promo.Color }}; }</style><p>{{ promo.Color }}</p>
"""
UNSAFE_SPOTS = [
    (2, "payload value in href= without the url reader"),
    (3, "payload value in href= without the url reader"),
    (3, "payload value in onclick= (an event handler): never"),
    (4, "payload value in src= without the url reader"),
    (4, "payload value in an unquoted alt= value"),
    (5, "payload value in action= without the url reader"),
    (5, "payload value in formaction= without the url reader"),
    (7, "payload value in style= (code): never"),
    (7, "payload value inside a tag, outside any attribute value"),
    (8, "payload value inside <script>: pass it through | tojson"),
    (11, "payload value in href= without the url reader"),
    (12, "payload value in srcdoc= (code): never"),
    (13, "payload value in href= without the url reader"),
    (14, "payload value inside <style>: never"),
]


def template_dir(tmp_path: Path, **files: str) -> Path:
    root = tmp_path / "templates"
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return root


def test_check_templates_passes_safe_templates(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = template_dir(
        tmp_path, **{"page.html": SAFE_TEMPLATE, "emails/x.jinja": SAFE_TEMPLATE, "a.py": "x"}
    )
    code, out, err = run(capsys, "check", "--templates", str(root))
    assert (code, err) == (0, "")
    assert out == "OK: no template warnings in 2 file(s)\n"


def test_check_templates_reports_each_unsafe_spot_as_file_line_and_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = template_dir(tmp_path, **{"good.html": SAFE_TEMPLATE, "bad.html": UNSAFE_TEMPLATE})
    code, out, err = run(capsys, "check", "--templates", str(root))
    assert (code, err) == (1, "")
    *warnings, summary = out.splitlines()
    bad = str(root / "bad.html")
    found = [(int(line), message) for path, line, message in (w.split(":", 2) for w in warnings)]
    assert {w.split(":", 1)[0] for w in warnings} == {bad}  # nothing from good.html
    assert len(found) == len(UNSAFE_SPOTS)
    # In the order they appear in the file.
    for (line, message), (want_line, want) in zip(found, UNSAFE_SPOTS, strict=True):
        assert line == want_line and message.strip().startswith(want), (line, message)
    assert summary == f"FAILED: {len(UNSAFE_SPOTS)} template warning(s) in 2 file(s)"


def test_check_templates_with_keys_fails_on_either(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = template_dir(tmp_path, **{"page.html": SAFE_TEMPLATE})
    code, out, _ = run(capsys, "check", "--keys", "hero-banner", "--templates", str(good))
    assert code == 0
    assert "OK: 0 unknown, 0 not active" in out and "OK: no template warnings" in out
    bad = tmp_path / "bad.html"
    bad.write_text(UNSAFE_TEMPLATE, encoding="utf-8")
    code, out, _ = run(capsys, "check", "--keys", "hero-banner", "--templates", str(bad))
    assert code == 1
    assert f"{bad}:2: payload value in href=" in out
    code, out, _ = run(capsys, "check", "--keys", "zzzzzz", "--templates", str(good))
    assert code == 1


def test_check_templates_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "check", "--templates", str(tmp_path / "nowhere"))
    assert (code, out) == (1, "")
    assert_one_line_error(err, "nowhere")
    broken = template_dir(tmp_path, **{"broken.html": 'ok\n<a href="{{ hero.Cta ">\n'})
    code, out, _ = run(capsys, "check", "--templates", str(broken))
    assert code == 1
    assert out.startswith(f"{broken / 'broken.html'}:2: cannot read the template: ")
    (broken / "latin1.html").write_bytes(b"caf\xe9")
    code, out, _ = run(capsys, "check", "--templates", str(broken / "latin1.html"))
    assert code == 1
    assert "latin1.html:1: cannot read the template" in out


def test_check_templates_on_the_example_app_is_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "--templates", str(ROOT / "example_app" / "templates"))
    assert code == 0, out


# -- serve-local ----------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                return proc.stdout.readline()
        raise AssertionError("serve-local printed nothing in time")
    finally:
        selector.close()


def test_serve_local_runs_the_server_and_prints_the_base_url(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOENGAGE_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "personalize_middleware",
            "serve-local",
            "--port",
            "0",
            "--workspace-id",
            WORKSPACE,
            "--api-secret",
            SECRET,
            "--events-log",
            str(log),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = _read_line(proc, time.monotonic() + 15)
        assert first.startswith("MoEngage-compatible local server: http://127.0.0.1:"), first
        base = first.split(": ", 1)[1].strip()
        assert base.endswith("/v1")
        headers = {"MOE-APPKEY": WORKSPACE}
        deadline = time.monotonic() + 15
        with httpx.Client(timeout=2, auth=(WORKSPACE, SECRET), headers=headers) as client:
            while True:  # the socket is bound before the line is printed; wait for uvicorn
                try:
                    response = client.get(
                        base + "/experiences/metadata", params={"status": "Active"}
                    )
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
            assert response.status_code == 200
            assert response.json()["metadata"]["count"] == 4
        rest = ""
        while "clients:" not in rest:
            rest += _read_line(proc, time.monotonic() + 5)
        assert SECRET not in first + rest  # a secret given on the command line is not echoed
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (so -SIGTERM).
    assert proc.returncode in (0, -signal.SIGTERM), stderr
    assert "Finished server process" in stderr
    assert "Traceback" not in stderr


def test_serve_local_bad_file_fails_before_listening(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"experiences": [{"key": "x"}]}', encoding="utf-8")
    code, out, err = run(capsys, "serve-local", "--file", str(bad), "--port", "0")
    assert code == 1
    assert out == ""
    assert_one_line_error(err, "bad.json", "experience 'x'", "name")


def test_serve_local_port_in_use_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(capsys, "serve-local", "--port", str(port))
    assert code == 1
    assert out == ""
    assert_one_line_error(err, f"cannot listen on 127.0.0.1:{port}")


def test_serve_local_bad_port_and_workspace(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "serve-local", "--port", "70000")
    assert code == 1
    assert_one_line_error(err, "--port must be 0..65535")
    code, _, err = run(capsys, "serve-local", "--workspace-id", "bad id!", "--port", "0")
    assert code == 1
    assert_one_line_error(err, "workspace_id")
