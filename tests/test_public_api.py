"""Pins the public namespace: everything users import comes from the package root."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import personalize_middleware

EXPECTED = [
    "APIError",
    "AttributeOptions",
    "AuthenticationError",
    "BadRequestError",
    "BatcherStats",
    "CacheOptions",
    "CircuitBreaker",
    "CircuitOpenError",
    "ClientClosedError",
    "ClientLimits",
    "ConfigurationError",
    "CookieOptions",
    "Decision",
    "EventAction",
    "EventBatcher",
    "EventElement",
    "EventOutbox",
    "EventRecorder",
    "Experience",
    "ExperienceMetadata",
    "ExperienceStore",
    "Identity",
    "IdentityResolver",
    "InvalidExperienceError",
    "InvalidTokenError",
    "KeyOutcome",
    "Keyring",
    "Lifecycle",
    "LocalBackend",
    "MalformedResponseError",
    "MemoryOutbox",
    "OpenTelemetry",
    "PageTrace",
    "Personalization",
    "PersonalizeBackend",
    "PersonalizeClient",
    "PersonalizeError",
    "PersonalizeExtension",
    "PersonalizeMiddleware",
    "PersonalizeSettings",
    "PersonalizeTemplates",
    "PersonalizedTemplateResponse",
    "PreviewGrant",
    "PrometheusMetrics",
    "RateLimitedError",
    "RedisOutbox",
    "RedisSharedLayer",
    "RetryPolicy",
    "SQLiteOutbox",
    "SharedEntries",
    "SharedLayer",
    "StoreStats",
    "Telemetry",
    "TemplateExperience",
    "TemplateUsageError",
    "Tracking",
    "TrackingLimits",
    "TrackingOptions",
    "TrackingStats",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "create_local_server",
    "current_personalization",
    "default_identity",
    "get_personalization",
    "is_bot",
    "load_experiences_file",
    "preview_link",
    "qa_link",
    "require_experiences",
    "set_allowed_url_hosts",
    "setup_jinja",
    "setup_templates",
]


def test_all_is_pinned_and_sorted() -> None:
    assert personalize_middleware.__all__ == EXPECTED
    assert sorted(EXPECTED) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_every_public_name_is_importable(name: str) -> None:
    assert getattr(personalize_middleware, name) is not None


def test_every_error_derives_from_personalize_error() -> None:
    errors = [n for n in EXPECTED if n.endswith("Error") and n != "PersonalizeError"]
    for name in errors:
        assert issubclass(
            getattr(personalize_middleware, name), personalize_middleware.PersonalizeError
        )


def test_the_package_imports_without_the_optional_extras() -> None:
    """redis, pyyaml, fastapi, uvicorn, opentelemetry and prometheus_client are extras:
    importing the package must not need them."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        extras = {'redis', 'yaml', 'fastapi', 'uvicorn', 'itsdangerous',\n"
        "                  'opentelemetry', 'prometheus_client'}\n"
        "        if name.split('.')[0] in extras:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import personalize_middleware\n"
        "print(len(personalize_middleware.__all__))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(EXPECTED)


def _documented_imports(text: str) -> set[str]:
    """Names the page's Python blocks import from the package root."""
    names: set[str] = set()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        try:
            tree = ast.parse(block)
        except SyntaxError:  # a fragment: fall back to its one-line imports
            for line in re.findall(r"^from personalize_middleware import (.+)$", block, re.M):
                names.update(re.findall(r"\w+", line.replace(" as ", " ")))
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "personalize_middleware":
                names.update(alias.name for alias in node.names)
    return names


def test_every_name_the_docs_import_from_the_package_is_exported() -> None:
    root = Path(__file__).resolve().parents[1]
    missing = {}
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for name in _documented_imports(page.read_text()):
            if name not in personalize_middleware.__all__:
                missing[name] = page.name
    assert not missing, f"documented but not exported: {missing}"


def test_the_telemetry_libraries_are_imported_only_when_a_telemetry_is_created() -> None:
    code = (
        "import sys\n"
        "import personalize_middleware as pm\n"
        "loaded = lambda name: any(m.split('.')[0] == name for m in sys.modules)\n"
        "print(loaded('opentelemetry'), loaded('prometheus_client'))\n"
        "pm.PrometheusMetrics()\n"
        "pm.OpenTelemetry()\n"
        "print(loaded('opentelemetry'), loaded('prometheus_client'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True", "True"]
