"""A misconfiguration stops the server at start-up, with one line, under real uvicorn and
gunicorn (uvicorn worker) processes started with their default settings.

Regression: Starlette builds middleware lazily, inside the app's first ASGI call (the
lifespan under uvicorn). The middleware's constructor raised there, uvicorn's default
lifespan mode ("auto") logged "ASGI 'lifespan' protocol appears unsupported", served, and
every request answered 500. Now the constructor keeps the error and the middleware fails
the lifespan start-up with ``lifespan.startup.failed`` and one line.

Only ``--port 0`` / ``-b 127.0.0.1:0`` is added to the commands, so parallel runs never
fight over port 8000 (the lifespan runs before the port is bound anyway).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import require_tool
from tests.support.processes import ServerProcess, clean_env, python_executable, run_until_exit

pytestmark = pytest.mark.slow

#: A failed start-up must end the process within this (seconds, a loaded CI machine).
EXIT_WITHIN = 20.0
SECRET_KEY = "startup-tests-secret-key-0123456789"
CREDENTIALS = {"MOENGAGE_WORKSPACE_ID": "WS_STARTUP", "MOENGAGE_API_SECRET": "api-secret-1"}

FASTAPI_APP = """\
from fastapi import FastAPI
from starlette.middleware.sessions import SessionMiddleware

from personalize_middleware import PersonalizeMiddleware

app = FastAPI()


@app.get("/")
async def home():
    return {{"ok": True}}


app.add_middleware(PersonalizeMiddleware, {options})
app.add_middleware(SessionMiddleware, secret_key="session-secret")
"""

STARLETTE_APP = """\
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from personalize_middleware import PersonalizeMiddleware


async def home(request):
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/", home)],
    middleware=[
        Middleware(SessionMiddleware, secret_key="session-secret"),
        Middleware(PersonalizeMiddleware, {options}),
    ],
)
"""


@dataclass(frozen=True)
class Case:
    options: str
    needles: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    app: str = FASTAPI_APP


CASES = {
    "latency_budget": Case(
        'latency_budget="fast"', ("latency_budget='fast'", "expected a positive number")
    ),
    "routes-list": Case(
        'routes=["hero-banner"]',
        ("routes=['hero-banner']", "expected a dict of path pattern -> list of keys"),
        app=STARLETTE_APP,
    ),
    "routes-string": Case(
        'routes={"/": "hero-banner"}', ("routes['/']='hero-banner'", "expected a list of keys")
    ),
    "missing-file": Case(
        'local_experiences="experiences.yaml"',
        ("local_experiences='experiences.yaml'", "no such file", "expected a .json or .yaml"),
        app=STARLETTE_APP,
    ),
    "malformed-file": Case(
        'local_experiences="experiences.json"',
        ("local_experiences='experiences.json'", "experience 'hero-banner'", "name"),
        files={"experiences.json": json.dumps({"experiences": [{"key": "hero-banner"}]})},
    ),
    "impressions": Case(
        'impressions="browser"', ("impressions='browser'", "expected 'client' or 'server'")
    ),
    "unknown-keyword": Case(
        "latency_budgt=0.2",
        ("latency_budgt=0.2", "unknown option", "did you mean latency_budget?"),
        app=STARLETTE_APP,
    ),
    "half-set-environment": Case(
        "",
        ("MOENGAGE_WORKSPACE_ID is set but MOENGAGE_API_SECRET is not",),
        env={"MOENGAGE_WORKSPACE_ID": "WS_STARTUP"},
    ),
    "public-report-with-credentials": Case(
        "report=True", ("report=True", "authorize(request)"), env=CREDENTIALS
    ),
    "short-secret-key": Case(
        'secret_key="..."', ("secret_key=<3 characters>", "at least 16 characters")
    ),
}


def write_app(tmp_path: Path, case: Case) -> None:
    options = case.options
    if "secret_key" not in options:
        options = f"secret_key={SECRET_KEY!r}" + (", " + options if options else "")
    (tmp_path / "app.py").write_text(case.app.format(options=options), encoding="utf-8")
    for name, text in case.files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")


def server_command(server: str) -> list[str]:
    python = python_executable()
    if server == "uvicorn":
        return [python, "-m", "uvicorn", "app:app", "--port", "0"]
    return [
        python,
        "-m",
        "gunicorn",
        "-k",
        "uvicorn.workers.UvicornWorker",
        "app:app",
        "-b",
        "127.0.0.1:0",
    ]


def require_gunicorn(server: str) -> None:
    if server == "gunicorn":
        try:
            import gunicorn  # noqa: F401
        except ImportError:
            require_tool(False, "gunicorn (pip install -e '.[dev]')")


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
@pytest.mark.parametrize("name", list(CASES))
def test_regression_a_misconfiguration_stops_the_server_with_one_line(
    tmp_path: Path, server: str, name: str
) -> None:
    require_gunicorn(server)
    case = CASES[name]
    write_app(tmp_path, case)
    started = time.monotonic()
    status, output = run_until_exit(
        server_command(server),
        cwd=tmp_path,
        env=clean_env(case.env, home=tmp_path),
        timeout=EXIT_WITHIN,
    )
    elapsed = time.monotonic() - started
    assert status != 0, output
    assert elapsed < EXIT_WITHIN
    ours = [line for line in output.splitlines() if "personalize-middleware:" in line]
    assert len(ours) == 1, output
    assert "configuration error: " in ours[0], output
    for needle in case.needles:
        assert needle in ours[0], output
    assert "Traceback" not in output
    assert "appears unsupported" not in output
    assert "Application startup complete" not in output


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_a_good_configuration_starts_and_serves(tmp_path: Path, server: str) -> None:
    """The other half of the proof: the same harness sees a good app start and answer."""
    require_gunicorn(server)
    write_app(tmp_path, Case('routes={"/": ["hero-banner"]}', ()))
    with ServerProcess(server_command(server), cwd=tmp_path, env=clean_env(home=tmp_path)) as app:
        base = app.wait_until_serving()
        app.wait_for("Application startup complete")
        response = httpx.get(base + "/", timeout=10)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "private, no-store"  # personalized
        # Local mode announces itself once, at WARNING, which the servers show by default.
        warnings = [line for line in app.lines if "LOCAL MODE" in line]
        assert len(warnings) == 1, app.output
        assert "sample_experiences.json" in warnings[0]
        assert "report at /_personalize/report" in warnings[0]
