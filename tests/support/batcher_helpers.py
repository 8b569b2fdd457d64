"""Lifecycle helpers for tests that run an ``EventBatcher``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from personalize_middleware._interfaces import PersonalizeBackend
from personalize_middleware.tracking._batcher import EventBatcher


@asynccontextmanager
async def running_batcher(
    backend: PersonalizeBackend, **options: Any
) -> AsyncIterator[EventBatcher]:
    """An ``EventBatcher`` whose sender is started, and closed even when the test fails,
    so a failing assertion does not leave the sender task running into the next test.

    A test may close it itself (that is often what it checks): ``aclose`` is idempotent.
    """
    batcher = EventBatcher(backend, **options)
    await batcher.start()
    try:
        yield batcher
    finally:
        await batcher.aclose()
