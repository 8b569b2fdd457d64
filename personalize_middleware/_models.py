"""Typed experiences, metadata, identities and event elements."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "ACTION_CLICKED",
    "ACTION_SHOWN",
    "DATA_TYPES",
    "EXPERIENCE_STATUSES",
    "CachedExperience",
    "EventAction",
    "EventElement",
    "Experience",
    "ExperienceMetadata",
    "FetchQuery",
    "Identity",
    "convert_payload_value",
    "identity_hash",
]

from ._exceptions import InvalidExperienceError

logger = logging.getLogger("personalize_middleware")

DATA_TYPES: tuple[str, ...] = ("string", "number", "float", "boolean", "json")
EXPERIENCE_STATUSES: tuple[str, ...] = ("Active", "Paused", "Scheduled")
ACTION_SHOWN = "MOE_PERSONALIZATION_MESSAGE_SHOWN"
ACTION_CLICKED = "MOE_PERSONALIZATION_MESSAGE_CLICKED"

_MISSING: Any = object()


class _Unconvertible(ValueError):
    pass


def convert_payload_value(value: Any, data_type: str) -> Any:
    """Convert one payload value by its ``data_type``; raise ``ValueError`` when it cannot.

    Values may arrive as strings whatever the data_type (the API does that), so strings are
    parsed for ``number``, ``float``, ``boolean`` and ``json``.
    """
    if data_type == "string":
        if isinstance(value, str):
            return value
        if isinstance(value, bool) or value is None or isinstance(value, dict | list):
            raise _Unconvertible(f"not a string: {type(value).__name__}")
        if isinstance(value, int | float):
            return str(value)
        raise _Unconvertible(f"not a string: {type(value).__name__}")
    if data_type == "number":
        return _to_number(value, allow_int=True)
    if data_type == "float":
        try:
            return float(_to_number(value, allow_int=False))
        except OverflowError as exc:  # a JSON integer beyond float range
            raise _Unconvertible("number out of float range") from exc
    if data_type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _Unconvertible("not a boolean")
    if data_type == "json":
        if isinstance(value, dict | list):
            return value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise _Unconvertible("not valid JSON") from exc
            if isinstance(parsed, dict | list):
                return parsed
        raise _Unconvertible("not a JSON object or array")
    raise _Unconvertible(f"unknown data_type {data_type!r}")


def _to_number(value: Any, *, allow_int: bool) -> int | float:
    if isinstance(value, bool):
        raise _Unconvertible("a boolean is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Unconvertible("not a finite number")
        return value
    if isinstance(value, str):
        text = value.strip()
        if allow_int:
            try:
                return int(text)
            except ValueError:
                pass
        try:
            number = float(text)
        except ValueError as exc:
            raise _Unconvertible("not a number") from exc
        if not math.isfinite(number):
            raise _Unconvertible("not a finite number")
        return number
    raise _Unconvertible("not a number")


@dataclass(frozen=True, slots=True)
class Experience:
    """One experience the API returned for a user.

    ``payload`` maps each variable name to its value converted by ``data_type``; a value
    that did not convert is left out (and logged), so the template's default applies.
    ``raw_payload`` and ``experience_context`` are kept exactly as received, unknown
    fields included: the events call copies the context back.
    """

    key: str
    payload: Mapping[str, Any]
    experience_context: Mapping[str, Any]
    raw_payload: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: Encodings derived from the fields above, memoised by the package that needs them
    #: under its own name (tracking keeps its encoded context under ``"track"``). Never
    #: semantic: not an argument, not compared, not in ``repr``, ``to_api`` or the wire.
    derived: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def get(self, name: str, default: Any = None) -> Any:
        """The converted value of payload variable ``name``, or ``default``."""
        value = self.payload.get(name, _MISSING)
        return default if value is _MISSING else value

    def __contains__(self, name: object) -> bool:
        return name in self.payload

    @property
    def variation_id(self) -> str | None:
        value = self.experience_context.get("moe_variation_id")
        return None if value is None else str(value)

    @classmethod
    def from_api(cls, key: str, data: Any) -> Experience:
        """Build from one ``experiences[KEY]`` object of a Fetch Experience answer.

        Raises ``ValueError`` when the object does not have the documented shape.
        """
        if not isinstance(data, Mapping):
            raise InvalidExperienceError(f"experience {key!r} is not an object")
        raw_payload = data.get("payload", {})
        context = data.get("experience_context", {})
        if raw_payload is None:
            raw_payload = {}
        if not isinstance(raw_payload, Mapping):
            raise InvalidExperienceError(f"experience {key!r}: payload is not an object")
        if not isinstance(context, Mapping):
            raise InvalidExperienceError(f"experience {key!r}: experience_context is not an object")
        payload: dict[str, Any] = {}
        for name, item in raw_payload.items():
            if not isinstance(item, Mapping) or "value" not in item:
                logger.warning(
                    "personalize: experience %r variable %r has no value; default used",
                    key,
                    name,
                )
                continue
            data_type = item.get("data_type", "string")
            try:
                payload[str(name)] = convert_payload_value(item["value"], str(data_type))
            except (ValueError, TypeError) as exc:
                logger.warning(
                    "personalize: experience %r variable %r (%s) did not convert: %s; default used",
                    key,
                    name,
                    data_type,
                    exc,
                )
        return cls(
            key=key,
            payload=MappingProxyType(payload),
            experience_context=MappingProxyType(dict(context)),
            raw_payload=MappingProxyType(dict(raw_payload)),
        )

    def to_api(self) -> dict[str, Any]:
        """The wire shape again (JSON-serialisable), e.g. for a shared cache."""
        return {
            "payload": dict(self.raw_payload),
            "experience_context": dict(self.experience_context),
        }


@dataclass(frozen=True, slots=True)
class ExperienceMetadata:
    """One entry of the Fetch Experience Metadata answer."""

    key: str
    name: str
    status: str

    @property
    def is_active(self) -> bool:
        return self.status == "Active"

    @classmethod
    def from_api(cls, data: Any) -> ExperienceMetadata:
        if not isinstance(data, Mapping):
            raise InvalidExperienceError("metadata entry is not an object")
        key = data.get("experience_key")
        if not isinstance(key, str) or not key:
            raise InvalidExperienceError("metadata entry has no experience_key")
        name = data.get("experience_name", "")
        status = data.get("status", "")
        return cls(key=key, name=str(name or ""), status=str(status or ""))


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the request is for.

    ``customer_id`` is MoEngage's primary identity; ``user_identifiers`` (``u_em``,
    ``u_mb`` or custom) the fallback; ``visitor_id`` the signed anonymous id used when
    neither is known (sent to the API as ``customer_id``).
    """

    customer_id: str | None = None
    user_identifiers: Mapping[str, str] | None = None
    visitor_id: str | None = None

    @property
    def is_anonymous(self) -> bool:
        return self.customer_id is None and not self.user_identifiers

    @property
    def api_customer_id(self) -> str | None:
        """The ``customer_id`` sent to the API: the customer's, else the visitor's."""
        if self.customer_id is not None:
            return self.customer_id
        if self.user_identifiers:
            return None
        return self.visitor_id

    @property
    def cache_key(self) -> str:
        """A stable string naming this identity (no two identities share one)."""
        if self.customer_id is not None:
            return "c:" + self.customer_id
        if self.user_identifiers:
            return "u:" + json.dumps(dict(sorted(self.user_identifiers.items())))
        return "v:" + (self.visitor_id or "")


Platform = Literal["web", "android", "ios", "tv"]


class EventAction(TypedDict):
    """One action of an events element, as the Track Experience Events API wants it."""

    action: str
    moe_event_uuid: str
    event_time: int
    platform: str
    attributes: dict[str, Any]


class EventElement(TypedDict):
    """One element (one user) of a Track Experience Events call."""

    customer_id: str
    actions: list[EventAction]
    user_attributes: NotRequired[dict[str, Any]]
    user_timezone_offset: NotRequired[int]


class FetchQuery:
    """Who is asking and in which context: everything the answer depends on."""

    __slots__ = (
        "_context_hash",
        "_identity_hash",
        "attributes",
        "context_key",
        "identity",
        "identity_key",
    )

    def __init__(self, identity: Identity, attributes: Mapping[str, str]) -> None:
        self.identity = identity
        self.attributes = attributes
        # Computed once: read several times a request (identities are immutable).
        self.identity_key: str = identity.cache_key
        self.context_key: tuple[tuple[str, str], ...] = tuple(sorted(attributes.items()))
        self._identity_hash: str | None = None
        self._context_hash: str | None = None

    @property
    def identity_hash(self) -> str:
        """A digest of the identity (no personal data in shared cache keys)."""
        if self._identity_hash is None:
            self._identity_hash = _digest(self.identity_key)
        return self._identity_hash

    @property
    def context_hash(self) -> str:
        if self._context_hash is None:
            self._context_hash = _digest(json.dumps(self.context_key, separators=(",", ":")))
        return self._context_hash


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def identity_hash(identity: Identity) -> str:
    """The digest ``FetchQuery.identity_hash`` uses, for invalidation by identity."""
    return _digest(identity.cache_key)


@dataclass(frozen=True, slots=True)
class CachedExperience:
    """One cached answer for one key: the experience, or ``None`` for "no match"."""

    experience: Experience | None
    fetched_at: float
