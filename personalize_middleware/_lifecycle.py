"""The one lifecycle state every long-lived component reports (``.state``)."""

from __future__ import annotations

import enum

from ._exceptions import ConfigurationError

__all__ = ["Lifecycle", "startup_failure"]


class Lifecycle(enum.Enum):
    """``NEW`` → ``RUNNING`` → ``CLOSING`` → ``CLOSED`` (→ ``RUNNING`` again: a test client
    may run several lifespans on one middleware)."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


def startup_failure(exc: BaseException) -> str:
    """What a failed start-up says (``lifespan.startup.failed``): one line, whatever the
    exception's message held."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ConfigurationError):
        return f"personalize-middleware: configuration error: {text}"
    return f"personalize-middleware: start-up failed: {type(exc).__name__}: {text}"
