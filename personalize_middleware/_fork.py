"""Fork safety: what a forked child must not inherit from its parent.

Servers that import the app before forking workers (``gunicorn --preload``, uvicorn's
``--workers`` on some platforms) copy the parent's memory into each child. Event-loop
objects (tasks, futures, locks), sockets and connection pools made in the parent are then
shared, or dead, in every child: a batcher task that never runs, a Redis connection two
processes write to at once. The middleware creates such things only when it starts, in the
process that serves; and ``os.register_at_fork`` resets anything made earlier (a warm-up
in the parent), so each child starts clean.

A component that holds such state registers itself (``register``) and implements
``reset_after_fork()``, which runs in the child right after the fork. What it drops is
handed to ``abandon``: kept referenced, never closed and never collected, because closing
or finalising the parent's sockets from the child could cut the parent's connections.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Protocol

__all__ = ["ForkSafe", "abandon", "register"]


class ForkSafe(Protocol):
    def reset_after_fork(self) -> None: ...


_registered: weakref.WeakSet[Any] = weakref.WeakSet()
_abandoned: list[Any] = []


def register(component: ForkSafe) -> None:
    """Run ``component.reset_after_fork()`` in every child forked from now on."""
    _registered.add(component)


def abandon(obj: Any) -> None:
    """Keep ``obj`` (the parent's) alive and untouched in this child."""
    if obj is not None:
        _abandoned.append(obj)


def _after_fork_in_child() -> None:
    for component in list(_registered):
        component.reset_after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which never forks
    os.register_at_fork(after_in_child=_after_fork_in_child)
