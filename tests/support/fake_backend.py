"""An in-process PersonalizeBackend for middleware tests: counts calls, can be gated."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from personalize_middleware import EventElement, Experience, ExperienceMetadata


def variation_for(customer_id: str | None, key: str) -> str:
    """Deterministic per-user variation, so cross-user mix-ups are detectable."""
    return f"{key}:{customer_id}"


class FakeBackend:
    """Answers every key with a payload naming the user, so a page shows whose it is."""

    def __init__(self, *, known_keys: Iterable[str] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.known_keys = set(known_keys) if known_keys is not None else None
        self.metadata: list[ExperienceMetadata] = []
        self.metadata_error: BaseException | None = None
        self.events: list[EventElement] = []
        self.answered = asyncio.Event()
        self.entered = 0
        self.closed = 0

    async def fetch_experiences(
        self,
        keys: Iterable[str],
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Experience]:
        keys = list(keys)
        self.calls.append(
            {
                "keys": keys,
                "customer_id": customer_id,
                "user_identifiers": dict(user_identifiers or {}),
                "attributes": dict(attributes or {}),
            }
        )
        if self.gate is not None:
            await self.gate.wait()
        try:
            if self.error is not None:
                raise self.error
            who = customer_id or (user_identifiers or {}).get("u_em")
            return {
                key: Experience.from_api(
                    key,
                    {
                        "payload": {
                            "title": {"value": variation_for(who, key), "data_type": "string"}
                        },
                        "experience_context": {
                            "cid": f"cid-{key}",
                            "experience": key,
                            "moe_variation_id": "1",
                            "audience_name": "All",
                            "audience_id": "a1",
                            "moe_locale_id": "0",
                            "type": "personalization",
                        },
                    },
                )
                for key in keys
                if self.known_keys is None or key in self.known_keys
            }
        finally:
            self.answered.set()

    async def fetch_metadata(
        self, statuses: Iterable[str] | None = None
    ) -> list[ExperienceMetadata]:
        if self.metadata_error is not None:
            raise self.metadata_error
        return list(self.metadata)

    async def track_events(self, elements: Sequence[EventElement]) -> None:
        self.events.extend(elements)

    async def aclose(self) -> None:
        self.closed += 1

    async def __aenter__(self) -> Self:
        self.entered += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
