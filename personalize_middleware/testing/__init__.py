"""A testing kit for apps that use personalize-middleware: no network, no MoEngage.

::

    def test_gold_customers_see_their_hero(moengage, client):
        moengage.pin("home-hero", {"title": "Welcome back"}, customer_id="alice")
        page = client.get("/", headers=...)             # the app, as alice
        assert "Welcome back" in page.text
        view(client, page)                              # the visitor saw it
        moengage.assert_tracked("impression", "home-hero", customer_id="alice")

The ``moengage`` fixture (a pytest plugin registered by the package) installs a
``FakeMoEngage`` that every ``PersonalizeMiddleware`` built during the test uses in place
of its own backend (the MoEngage client, or the local experiences file), with events
flushed quickly and the human-timing rules of the beacon endpoint relaxed so tests
need not wait. Outside pytest, ``override(fake)`` does the same as a context manager.
See ``docs/testing.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .._overrides import BackendOverride, install_override, remove_override
from ..tracking import TrackingLimits
from ._fake import FakeMoEngage, TrackedAction
from ._page import HookedPage, click, view

__all__ = ["FakeMoEngage", "HookedPage", "TrackedAction", "click", "override", "view"]

#: What tests relax: events leave the batcher at once, and the beacon endpoint accepts
#: an impression or a click however soon after the page was rendered.
_TEST_TRACKING = {"flush_interval": 0.01, "limits": TrackingLimits.off()}


@contextlib.contextmanager
def override(fake: FakeMoEngage) -> Iterator[FakeMoEngage]:
    """Every ``PersonalizeMiddleware`` built inside the block uses ``fake``."""
    installed = BackendOverride(backend=fake, tracking=_TEST_TRACKING)
    install_override(installed)
    try:
        yield fake
    finally:
        remove_override(installed)
