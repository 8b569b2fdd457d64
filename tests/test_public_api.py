"""Pins the public namespace: everything users import comes from the package root."""

from __future__ import annotations

import subprocess
import sys

import pytest

import personalize_middleware

EXPECTED = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "BatcherStats",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigurationError",
    "EventAction",
    "EventBatcher",
    "EventElement",
    "EventRecorder",
    "Experience",
    "ExperienceMetadata",
    "ExperienceStore",
    "Identity",
    "IdentityResolver",
    "InvalidTokenError",
    "Keyring",
    "Lifecycle",
    "LocalBackend",
    "MalformedResponseError",
    "Personalization",
    "PersonalizeBackend",
    "PersonalizeClient",
    "PersonalizeError",
    "PersonalizeExtension",
    "PersonalizeMiddleware",
    "PersonalizeSettings",
    "PersonalizeTemplates",
    "PersonalizedTemplateResponse",
    "RateLimitedError",
    "RedisSharedLayer",
    "RetryPolicy",
    "SharedEntries",
    "SharedLayer",
    "StoreStats",
    "TemplateExperience",
    "TemplateUsageError",
    "Tracking",
    "TrackingStats",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "create_local_server",
    "current_personalization",
    "default_identity",
    "get_personalization",
    "load_experiences_file",
    "require_experiences",
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
    """redis, pyyaml, fastapi and uvicorn are extras: importing the package must not need them."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        extras = {'redis', 'yaml', 'fastapi', 'uvicorn', 'itsdangerous'}\n"
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
