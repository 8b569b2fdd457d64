"""The interface shared by the HTTP client and the embedded local engine."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from ._models import EventElement, Experience, ExperienceMetadata

__all__ = ["PersonalizeBackend"]


@runtime_checkable
class PersonalizeBackend(Protocol):
    """What the middleware needs from MoEngage (or from the local engine).

    ``fetch_experiences`` returns only the keys that matched: an absent key is the API's
    "no match", not an error. Errors are ``APIError`` subclasses.
    """

    async def fetch_experiences(
        self,
        keys: Iterable[str],
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Experience]: ...

    async def fetch_metadata(
        self, statuses: Iterable[str] | None = None
    ) -> list[ExperienceMetadata]: ...

    async def track_events(self, elements: Sequence[EventElement]) -> None: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
