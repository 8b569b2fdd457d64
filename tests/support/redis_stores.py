"""Helpers shared by the Redis tests: stores wired to a RedisSharedLayer and a stand-in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from personalize_middleware import (
    ExperienceStore,
    Identity,
    PersonalizeClient,
    PersonalizeSettings,
    RedisSharedLayer,
)
from personalize_middleware._models import FetchQuery
from tests.support.redis_support import REDIS_URL, new_workspace

__all__ = ["KEYS", "customer", "layer_of", "open_store", "query", "wait_until"]

KEYS = ["hero", "banner"]


def customer() -> str:
    return "cust-" + new_workspace()


def query(customer_id: str, **attributes: str) -> FetchQuery:
    return FetchQuery(Identity(customer_id=customer_id), attributes or {"DAY": "Monday"})


@asynccontextmanager
async def open_store(
    base_url: str,
    workspace: str,
    *,
    url: str = REDIS_URL,
    clock: Callable[[], float] = time.time,
    store_options: dict[str, Any] | None = None,
    **layer_options: Any,
) -> AsyncIterator[ExperienceStore]:
    """An ExperienceStore (own L1, own Redis pool: one "process") over the stand-in."""
    settings = PersonalizeSettings(workspace_id="WS1", api_secret="secret-x", base_url=base_url)
    layer = RedisSharedLayer(url, workspace_id=workspace, **layer_options)
    store = ExperienceStore(
        PersonalizeClient(settings), shared=layer, clock=clock, **(store_options or {})
    )
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()
        await store.backend.aclose()


def layer_of(store: ExperienceStore) -> RedisSharedLayer:
    assert isinstance(store.shared, RedisSharedLayer)
    return store.shared


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a real condition (polled), failing the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
