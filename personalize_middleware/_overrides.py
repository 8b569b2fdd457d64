"""The testing kit's one hook into the middleware: a backend (and tracking options) that
every ``PersonalizeMiddleware`` built while it is installed uses instead of its own.

Process-wide on purpose: Starlette builds the middleware lazily, in whatever thread or
task first serves the app (``TestClient`` runs it in a portal thread), so a context
variable would not reach it. Installed and removed by ``personalize_middleware.testing``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import ConfigurationError
from ._interfaces import PersonalizeBackend

__all__ = ["BackendOverride", "current_override", "install_override", "remove_override"]


@dataclass(frozen=True, slots=True)
class BackendOverride:
    """``backend`` replaces the middleware's; ``tracking`` are keyword arguments for the
    ``Tracking`` the middleware builds (e.g. relaxed human-rate limits)."""

    backend: PersonalizeBackend
    tracking: Mapping[str, Any] = field(default_factory=dict)


_lock = threading.Lock()
_current: BackendOverride | None = None


def install_override(override: BackendOverride) -> None:
    global _current
    with _lock:
        if _current is not None and _current is not override:
            raise ConfigurationError(
                "another personalize_middleware testing override is installed", field="override"
            )
        _current = override


def remove_override(override: BackendOverride) -> None:
    global _current
    with _lock:
        if _current is override:
            _current = None


def current_override() -> BackendOverride | None:
    return _current
