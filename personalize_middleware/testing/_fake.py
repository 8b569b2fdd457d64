"""``FakeMoEngage``: MoEngage Personalize in memory, for the tests of your own app."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

from .._exceptions import APIError, UpstreamTimeoutError, UpstreamUnavailableError
from .._models import (
    ACTION_CLICKED,
    ACTION_SHOWN,
    EventElement,
    Experience,
    ExperienceMetadata,
)

__all__ = ["FakeMoEngage", "TrackedAction"]

Kind = Literal["impression", "click"]
_KINDS = {ACTION_SHOWN: "impression", ACTION_CLICKED: "click"}


@dataclass(frozen=True, slots=True)
class TrackedAction:
    """One impression or click that reached the (fake) events API."""

    customer_id: str
    kind: Kind
    key: str | None
    variation: str | None
    b_id: str | None
    event_uuid: str


@dataclass(frozen=True, slots=True)
class _Pin:
    payload: Mapping[str, Any]
    variation: str
    audience: str


class FakeMoEngage:
    """A ``PersonalizeBackend`` answering what you pinned, recording what was tracked.

    ``pin(key, payload)`` gives everyone ``payload`` for ``key``; with ``customer_id``
    only that customer (a customer's pin beats everyone's). Keys nobody pinned get the
    API's "no match", so the page renders its default. ``slow(seconds)`` delays every
    answer, ``fail()`` makes every call fail (``UpstreamUnavailableError`` unless you
    pass another ``APIError``), ``recover()`` undoes both. ``fetches`` lists each fetch's
    (customer_id, keys); ``tracked`` every impression and click delivered.

    Thread-safe: the app may run in ``TestClient``'s thread while the test asserts.
    """

    def __init__(self) -> None:
        self._pins: dict[str, dict[str | None, _Pin]] = {}
        self._lock = threading.Condition()
        self._delay = 0.0
        self._failure: APIError | None = None
        self.fetches: list[tuple[str | None, tuple[str, ...]]] = []
        self.tracked: list[TrackedAction] = []

    def __repr__(self) -> str:
        return f"FakeMoEngage(pinned={sorted(self._pins)}, tracked={len(self.tracked)})"

    # -- steering ----------------------------------------------------------------------------

    def pin(
        self,
        key: str,
        payload: Mapping[str, Any],
        *,
        customer_id: str | None = None,
        variation: str = "1",
        audience: str = "All Users",
    ) -> None:
        """Serve ``payload`` (variable name → value) for ``key`` to ``customer_id``
        (everyone when ``None``). Values are sent as MoEngage does: strings, numbers,
        booleans and JSON objects get their ``data_type``."""
        with self._lock:
            self._pins.setdefault(key, {})[customer_id] = _Pin(dict(payload), variation, audience)

    def unpin(self, key: str | None = None) -> None:
        """Forget ``key``'s pins (every pin when ``None``)."""
        with self._lock:
            if key is None:
                self._pins.clear()
            else:
                self._pins.pop(key, None)

    def slow(self, seconds: float) -> None:
        """Answer every call ``seconds`` late (the page should still render in budget)."""
        with self._lock:
            self._delay = float(seconds)

    def fail(self, error: APIError | None = None) -> None:
        """Fail every call with ``error`` (a 503 by default)."""
        with self._lock:
            self._failure = error or UpstreamUnavailableError(
                "fake MoEngage: 503 Service Unavailable", status_code=503
            )

    def timeout(self) -> None:
        """Fail every call as a timeout."""
        self.fail(UpstreamTimeoutError("fake MoEngage: timed out"))

    def recover(self) -> None:
        """Answer promptly and successfully again."""
        with self._lock:
            self._delay = 0.0
            self._failure = None

    # -- asserting ---------------------------------------------------------------------------

    def actions(
        self,
        kind: Kind | None = None,
        key: str | None = None,
        *,
        b_id: str | None = None,
        customer_id: str | None = None,
    ) -> list[TrackedAction]:
        """The tracked actions matching every given filter."""
        with self._lock:
            return [a for a in self.tracked if _matches(a, kind, key, b_id, customer_id)]

    def assert_tracked(
        self,
        kind: Kind,
        key: str,
        *,
        b_id: str | None = None,
        customer_id: str | None = None,
        count: int = 1,
        timeout: float = 5.0,
    ) -> list[TrackedAction]:
        """Wait (up to ``timeout`` s) until exactly ``count`` matching actions have been
        delivered, and return them. Events travel through the middleware's batcher, so
        they arrive a moment after the beacon: this waits for them, then checks that no
        more than ``count`` arrived."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [a for a in self.tracked if _matches(a, kind, key, b_id, customer_id)]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    break
                self._lock.wait(remaining)
        if len(found) != count:
            seen = "\n  ".join(repr(a) for a in self.tracked) or "(nothing)"
            raise AssertionError(
                f"expected {count} {kind}(s) of {key!r}"
                + (f" on {b_id!r}" if b_id else "")
                + (f" for {customer_id!r}" if customer_id else "")
                + f", got {len(found)}; tracked:\n  {seen}"
            )
        return found

    def assert_not_tracked(
        self, kind: Kind | None = None, key: str | None = None, *, customer_id: str | None = None
    ) -> None:
        """Nothing matching has been delivered (call it after flushing or a wait)."""
        found = self.actions(kind, key, customer_id=customer_id)
        if found:
            raise AssertionError(f"expected no {kind or 'event'}s, got {found}")

    # -- PersonalizeBackend -----------------------------------------------------------------

    async def fetch_experiences(
        self,
        keys: Iterable[str],
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Experience]:
        wanted = tuple(dict.fromkeys(keys))
        with self._lock:
            self.fetches.append((customer_id, wanted))
            pins = {k: dict(self._pins.get(k, {})) for k in wanted}
        await self._behave()
        found: dict[str, Experience] = {}
        for key, by_customer in pins.items():
            pin = by_customer.get(customer_id) if customer_id is not None else None
            pin = pin or by_customer.get(None)
            if pin is not None:
                found[key] = Experience.from_api(key, _wire(key, pin))
        return found

    async def fetch_metadata(
        self, statuses: Iterable[str] | None = None
    ) -> list[ExperienceMetadata]:
        await self._behave()
        wanted = None if statuses is None else set(statuses)
        with self._lock:
            keys = sorted(self._pins)
        if wanted is not None and "Active" not in wanted:
            return []
        return [ExperienceMetadata(key=k, name=k, status="Active") for k in keys]

    async def track_events(self, elements: Sequence[EventElement]) -> None:
        await self._behave()
        actions = [
            TrackedAction(
                customer_id=element["customer_id"],
                kind=_KINDS.get(action["action"], "impression"),  # type: ignore[arg-type]
                key=_experience_key(action["attributes"]),
                variation=_str(action["attributes"].get("moe_variation_id")),
                b_id=_str(action["attributes"].get("b_id")),
                event_uuid=action["moe_event_uuid"],
            )
            for element in elements
            for action in element["actions"]
        ]
        with self._lock:
            known = {a.event_uuid for a in self.tracked}
            # MoEngage deduplicates on moe_event_uuid: so does the fake.
            self.tracked.extend(a for a in actions if a.event_uuid not in known)
            self._lock.notify_all()

    async def _behave(self) -> None:
        with self._lock:
            delay, failure = self._delay, self._failure
        if delay:
            await asyncio.sleep(delay)
        if failure is not None:
            raise failure

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def _matches(
    action: TrackedAction,
    kind: str | None,
    key: str | None,
    b_id: str | None,
    customer_id: str | None,
) -> bool:
    return (
        (kind is None or action.kind == kind)
        and (key is None or action.key == key)
        and (b_id is None or action.b_id == b_id)
        and (customer_id is None or action.customer_id == customer_id)
    )


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _experience_key(attributes: Mapping[str, Any]) -> str | None:
    # The fake's own experience_context names the key (see _wire).
    return _str(attributes.get("experience_key"))


def _wire(key: str, pin: _Pin) -> dict[str, Any]:
    payload = {name: _variable(value) for name, value in pin.payload.items()}
    return {
        "payload": payload,
        "experience_context": {
            "cid": f"fake_{key}",
            "experience": key,
            "experience_key": key,
            "moe_locale_id": "0",
            "moe_variation_id": pin.variation,
            "audience_name": pin.audience,
            "audience_id": "fake",
            "type": "Web Personalization",
        },
    }


def _variable(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"value": value, "data_type": "boolean"}
    if isinstance(value, int | float):
        return {"value": value, "data_type": "number"}
    if isinstance(value, dict | list):
        return {"value": value, "data_type": "json"}
    return {"value": str(value), "data_type": "string"}
