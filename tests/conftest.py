from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def require_tool(available: bool, what: str) -> None:
    """Skip locally when a tool is missing; in CI (CI=true) fail instead of skipping."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but is missing", pytrace=False)
    pytest.skip(f"{what} is not available")
