"""The README runs as written: its quick starts, its command lines, its install line.

The code blocks are read from README.md itself (``tests/support/readme.py``), saved as
the files they name, and run the way a new user runs them: ``uvicorn app:app`` in a fresh
directory, no ``MOENGAGE_*`` variable (local mode, the packaged sample), each CLI line as
a process. The page must show a personalized variation, not the template's default.

Regression: the FastAPI quick start needed ``itsdangerous`` (not in the install line),
called ``PersonalizeSettings.from_env()`` (an error without an account) and read
``home-hero`` / ``Title`` / ``CtaLabel``, which the sample does not have; the Starlette one
never defined ``home`` nor imported ``SessionMiddleware``; the CLI example fetched a key
that does not exist and exited 0; the README said port 8765, ``serve-local`` listens on
8787.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from personalize_middleware.cli import DEFAULT_API_SECRET, DEFAULT_PORT, DEFAULT_WORKSPACE_ID
from personalize_middleware.local import load_sample_file
from tests.conftest import require_tool
from tests.support.processes import (
    REPO_ROOT,
    ServerProcess,
    clean_env,
    python_executable,
    run_until_exit,
)
from tests.support.readme import Block, install_command, section_blocks
from tests.support.tracking_helpers import BROWSER_USER_AGENT

SAMPLE = load_sample_file()
#: What the sample's hero-banner shows an anonymous visitor (the "All Users" audience).
ANONYMOUS_HERO_TITLES = ("Free shipping on orders over $50", "New arrivals are here")
TEMPLATE_DEFAULT = "<h1>Welcome</h1>"

#: A person's browser: httpx's own user agent is on the crawler list (no tracking hooks).
BROWSER = {"user-agent": BROWSER_USER_AGENT}


def payload_names(key: str) -> set[str]:
    return {
        name
        for audience in SAMPLE.experiences[key].audiences
        for variation in audience.variations
        for name in variation.payload
    }


def write_blocks(directory: Path, blocks: list[Block]) -> None:
    for block in blocks:
        if block.file is None:
            continue
        target = directory / block.file
        target.parent.mkdir(parents=True, exist_ok=True)
        if block.continues:
            with target.open("a", encoding="utf-8") as out:
                out.write("\n\n" + block.text)
        else:
            target.write_text(block.text, encoding="utf-8")


def quick_start(directory: Path, section: str) -> Path:
    """The section's files; the Starlette quick start shares the FastAPI template."""
    template = [b for b in section_blocks("Quick start: FastAPI") if b.language == "jinja"]
    write_blocks(directory, template + section_blocks(section))
    assert (directory / "app.py").is_file() and (directory / "templates/home.html").is_file()
    return directory


@pytest.fixture(scope="module")
def fastapi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quick_start(tmp_path_factory.mktemp("fastapi"), "Quick start: FastAPI")


@pytest.fixture(scope="module")
def running_quick_start(fastapi_dir: Path) -> Iterator[tuple[str, ServerProcess]]:
    command = [python_executable(), "-m", "uvicorn", "app:app", "--port", "0"]
    with ServerProcess(command, cwd=fastapi_dir, env=clean_env(home=fastapi_dir)) as server:
        base = server.wait_until_serving()
        yield base, server


def assert_personalized(page: httpx.Response) -> None:
    assert page.status_code == 200, page.text
    assert TEMPLATE_DEFAULT not in page.text, page.text
    assert any(title in page.text for title in ANONYMOUS_HERO_TITLES), page.text
    assert "data-pz-impression" in page.text and "data-pz-click" in page.text
    assert "<script" in page.text


# -- install ----------------------------------------------------------------------------------


def extras_closure(extras: set[str]) -> set[str]:
    """Every requirement name the extras pull in (following self-references)."""
    optional = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        assert extra in optional, f"the README installs [{extra}], pyproject has no such extra"
        for requirement in optional[extra]:
            name = re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0].lower()
            if name == "personalize-middleware":
                todo += re.findall(r"[\w-]+", requirement.split("[", 1)[1].split("]")[0])
            else:
                names.add(name)
    return names


def test_the_install_line_brings_what_the_quick_starts_import() -> None:
    argv = install_command()
    assert argv[:2] == ["pip", "install"]
    (requirement,) = argv[2:]
    match = re.fullmatch(r"personalize-middleware\[([\w,-]+)\]", requirement)
    assert match, requirement
    # SessionMiddleware needs itsdangerous; `uvicorn app:app` needs uvicorn.
    assert {"fastapi", "uvicorn", "itsdangerous"} <= extras_closure(set(match[1].split(",")))
    assert {"uvicorn", "itsdangerous"} <= extras_closure({"server"})  # the Starlette line


# -- quick starts -----------------------------------------------------------------------------


@pytest.mark.slow
def test_fastapi_quick_start_runs_as_written_and_shows_a_variation(
    running_quick_start: tuple[str, ServerProcess],
) -> None:
    base, server = running_quick_start
    with httpx.Client(base_url=base, timeout=10, headers=BROWSER) as client:
        first = client.get("/")
        assert_personalized(first)
        again = client.get("/")  # the visitor cookie keeps the variation
        hero = next(t for t in ANONYMOUS_HERO_TITLES if t in first.text)
        assert hero in again.text
        report = client.get("/_personalize/report")
        assert report.status_code == 200 and "Homepage hero banner" in report.text
    # Local mode says so once, at WARNING (shown by uvicorn's default logging).
    local = [line for line in server.lines if "LOCAL MODE" in line]
    assert len(local) == 1, server.output
    assert "sample_experiences.json" in local[0] and "/_personalize/report" in local[0]
    assert "Traceback" not in server.output


@pytest.mark.slow
def test_fastapi_dependencies_block_runs_as_written(
    running_quick_start: tuple[str, ServerProcess],
) -> None:
    base, _ = running_quick_start
    data = httpx.get(base + "/offers", timeout=10).json()
    upsell_names = {
        v.payload["product_name"]["value"]
        for a in SAMPLE.experiences["product-upsell"].audiences
        for v in a.variations
    }
    assert data["upsell"] in upsell_names
    assert data["promo"] == "Free returns within 30 days"  # anonymous, not on a phone


@pytest.mark.slow
def test_starlette_quick_start_runs_as_written_and_shows_a_variation(tmp_path: Path) -> None:
    quick_start(tmp_path, "Quick start: Starlette")
    command = [python_executable(), "-m", "uvicorn", "app:app", "--port", "0"]
    with ServerProcess(command, cwd=tmp_path, env=clean_env(home=tmp_path)) as server:
        base = server.wait_until_serving()
        assert_personalized(httpx.get(base + "/", timeout=10, headers=BROWSER))


# -- command line -----------------------------------------------------------------------------


def command_lines() -> list[list[str]]:
    (block,) = section_blocks("Command line")
    lines = [shlex.split(line, comments=True) for line in block.text.splitlines()]
    return [argv for argv in lines if argv]


@pytest.mark.slow
@pytest.mark.parametrize("argv", command_lines(), ids=lambda argv: argv[3])
def test_command_line_runs_as_written(fastapi_dir: Path, argv: list[str]) -> None:
    assert argv[:3] == ["python", "-m", "personalize_middleware"]
    command = [python_executable(), *argv[1:]]
    env = clean_env(home=fastapi_dir)
    if argv[3] in ("preview", "qa-cookie"):
        # As the README says: the app's secret_key, from the environment.
        env["PERSONALIZE_SECRET_KEY"] = "readme-test-signing-key-0123456789"
    if argv[3] == "serve-local":
        serve_local_answers_like_moengage([*command, "--port", "0"], fastapi_dir, env)
        return
    status, output = run_until_exit(command, cwd=fastapi_dir, env=env, timeout=60)
    assert status == 0, output
    assert "error" not in output.lower(), output
    if argv[3] == "fetch":
        for key in argv[argv.index("alice") + 1 :]:
            assert f"{key}: variation " in output, output  # every key exists and matches
    if argv[3] == "check":
        assert output.splitlines()[-1] == "OK: 0 unknown, 0 not active", output


def serve_local_answers_like_moengage(command: list[str], cwd: Path, env: Any) -> None:
    with ServerProcess(command, cwd=cwd, env=env) as server:
        base = server.wait_until_serving()
        auth = (DEFAULT_WORKSPACE_ID, DEFAULT_API_SECRET)
        body = {"identifiers": {"customer_id": "alice"}, "experience_key": ["hero-banner"]}
        fetched = httpx.post(
            base + "/v1/experiences/fetch",
            json=body,
            auth=auth,
            headers={"MOE-APPKEY": DEFAULT_WORKSPACE_ID},
            timeout=10,
        )
        assert fetched.status_code == 200, fetched.text
        assert "hero-banner" in fetched.json()["experiences"]
        assert httpx.get(base + "/report/", timeout=10).status_code == 401
        assert httpx.get(base + "/report/", auth=auth, timeout=10).status_code == 200


def test_one_default_port_for_serve_local_in_code_and_docs() -> None:
    texts = {p.name: p.read_text() for p in [REPO_ROOT / "README.md", *REPO_ROOT.glob("docs/*.md")]}
    ports = {
        (name, int(port))
        for name, text in texts.items()
        for port in re.findall(r"127\.0\.0\.1:(\d+)/v1|serve-local[^\n]*--port (\d+)", text)
        for port in port
        if port
    }
    assert ports, "the docs should say where serve-local listens"
    assert {port for _, port in ports} == {DEFAULT_PORT}, ports


# -- the docs and the sample agree ------------------------------------------------------------

KEY_PATTERNS = (
    r'{%-? experience "([^"]+)"',
    r'personalize_(?:value|experience)\("([^"]+)"',
    r'require_experiences\("([^"]+)"',
    r'personalize\.get\("([^"]+)"',
    r'routes=\{"[^"]+": \["([^"]+)"',
    r'"/products/\{id\}": \["([^"]+)"',
    r'site_keys=\["([^"]+)"',
)
VARIABLE_PATTERN = r'\b(?:hero|upsell|promo|x)\.(?:get|string|number|boolean|json)\("(\w+)"'
DOCS = ("README.md", "docs/templates.md", "docs/tracking.md", "docs/deployment-redis.md")


def test_doc_examples_use_the_sample_experiences_keys_and_variables() -> None:
    every_variable = {name for key in SAMPLE.experiences for name in payload_names(key)}
    for doc in DOCS:
        text = (REPO_ROOT / doc).read_text()
        keys = {key for pattern in KEY_PATTERNS for key in re.findall(pattern, text)}
        keys.discard("key")  # the syntax table's placeholder: {% experience "key" as x %}
        assert keys <= set(SAMPLE.experiences), (doc, keys - set(SAMPLE.experiences))
        variables = set(re.findall(VARIABLE_PATTERN, text))
        assert variables <= every_variable, (doc, variables - every_variable)
    readme = (REPO_ROOT / "README.md").read_text()
    assert 'experience "hero-banner"' in readme and 'hero.string("title"' in readme


def test_local_experiences_doc_example_is_a_part_of_the_sample() -> None:
    from personalize_middleware.local import parse_experiences

    require_tool(importlib.util.find_spec("yaml") is not None, "PyYAML (the yaml extra)")
    import yaml

    (example,) = [
        b for b in section_blocks("A complete example", REPO_ROOT / "docs/local-experiences.md")
    ]
    parsed = parse_experiences(yaml.safe_load(example.text), source="docs")
    for key, experience in parsed.experiences.items():
        assert key in SAMPLE.experiences, key
        names = {n for a in experience.audiences for v in a.variations for n in v.payload}
        assert names <= payload_names(key), (key, names - payload_names(key))
    answer = [
        b
        for b in section_blocks("What the engine answers", REPO_ROOT / "docs/local-experiences.md")
        if b.language == "json"
    ]
    for key, wire in json.loads(answer[0].text)["experiences"].items():
        assert set(wire["payload"]) <= payload_names(key)
