"""The pytest plugin (entry point ``pytest11``): the ``moengage`` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import FakeMoEngage, override

__all__ = ["moengage"]


@pytest.fixture
def moengage() -> Iterator[FakeMoEngage]:
    """A ``FakeMoEngage`` that every ``PersonalizeMiddleware`` built during the test uses:
    pin what users get, make the upstream slow or failing, assert what was tracked.
    Build the app (or its ``TestClient``) inside the test or in a fixture that depends
    on this one, so the middleware is created while the fake is installed."""
    with override(FakeMoEngage()) as fake:
        yield fake
