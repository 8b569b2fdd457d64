"""The one lifecycle state every long-lived component reports (``.state``)."""

from __future__ import annotations

import enum

__all__ = ["Lifecycle"]


class Lifecycle(enum.Enum):
    """``NEW`` → ``RUNNING`` → ``CLOSING`` → ``CLOSED`` (→ ``RUNNING`` again: a test client
    may run several lifespans on one middleware)."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"
