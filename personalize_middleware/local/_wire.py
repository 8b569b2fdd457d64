"""Request validation as the MoEngage Personalize API does it (hand-written, no spec library).

Shared by the local server (which answers 400 with the API's error body) and by
``LocalBackend`` (which raises ``BadRequestError``, as the HTTP client would).
"""

from __future__ import annotations

import secrets
import string
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from .._models import ACTION_CLICKED, ACTION_SHOWN
from ._rules import DAYS_OF_THE_WEEK

__all__ = [
    "MAX_ELEMENTS",
    "MAX_KEYS",
    "FetchRequest",
    "WireError",
    "error_code",
    "validate_elements",
    "validate_events_body",
    "validate_fetch_body",
    "validate_session_attributes",
]

MAX_KEYS = 25
MAX_ELEMENTS = 100
ACTIONS: tuple[str, ...] = (ACTION_SHOWN, ACTION_CLICKED)
PLATFORMS: tuple[str, ...] = ("web", "android", "ios", "tv")
HOURS: tuple[str, ...] = tuple(f"{hour:02d}" for hour in range(24))
REQUIRED_ATTRIBUTES: tuple[str, ...] = (
    "cid",
    "experience",
    "moe_locale_id",
    "moe_variation_id",
    "audience_name",
    "audience_id",
    "type",
)
EXPERIENCE_TYPES: tuple[str, ...] = ("Web Personalization",)
MAX_TIMEZONE_OFFSET = 54000
# Anything at or above this is milliseconds (year 2286 in seconds): the classic mistake.
_MAX_EVENT_TIME = 10_000_000_000
_IDENTIFIERS_FIELDS = ("customer_id", "user_identifiers")


class WireError(ValueError):
    """A request the API would refuse with 400: ``title`` and ``description`` as it sends."""

    def __init__(self, description: str, *, title: str = "Invalid Field Value") -> None:
        super().__init__(description)
        self.title = title
        self.description = description


def error_code() -> str:
    """An opaque 8-letter error code, like the API's ``code``."""
    return "".join(secrets.choice(string.ascii_letters) for _ in range(8))


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """A validated Fetch Experience body. ``keys`` is None when ``experience_key`` is absent."""

    customer_id: str | None = None
    user_identifiers: Mapping[str, str] | None = None
    keys: list[str] | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


def validate_fetch_body(body: Any) -> FetchRequest:
    """Validate a decoded Fetch Experience body; more than 25 keys keeps the first 25."""
    if not isinstance(body, Mapping):
        raise WireError("body - must be a JSON object")
    identifiers = body.get("identifiers")
    customer_id: str | None = None
    user_identifiers: Mapping[str, str] | None = None
    if identifiers is not None:
        if not isinstance(identifiers, Mapping):
            raise WireError("identifiers - must be an object")
        customer_id = identifiers.get("customer_id")
        if customer_id is not None and not isinstance(customer_id, str):
            raise WireError("identifiers.customer_id - must be a string")
        user_identifiers = _user_identifiers(identifiers.get("user_identifiers"))
    raw_keys = body.get("experience_key")
    keys: list[str] | None = None
    if raw_keys is not None:
        if not isinstance(raw_keys, list) or not all(isinstance(k, str) for k in raw_keys):
            raise WireError("experience_key - must be an array of strings")
        # The API silently answers only the first 25 keys; mimic it, do not refuse.
        keys = raw_keys[:MAX_KEYS]
    attributes = {k: v for k, v in body.items() if k not in ("identifiers", "experience_key")}
    validate_session_attributes(attributes)
    return FetchRequest(
        customer_id=customer_id, user_identifiers=user_identifiers, keys=keys, attributes=attributes
    )


def _user_identifiers(raw: Any) -> Mapping[str, str] | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        # The spec's schema says string, every example sends an object: accept both,
        # a plain string simply names no identifier we can resolve.
        return None
    if not isinstance(raw, Mapping) or not all(isinstance(v, str) for v in raw.values()):
        raise WireError("identifiers.user_identifiers - must be an object of strings")
    return dict(raw)


def validate_session_attributes(attributes: Mapping[str, Any]) -> None:
    """Check the in-session attributes the API knows (day, hour, IP, user agent)."""
    day = attributes.get("DAY_OF_THE_WEEK")
    if day is not None and day not in DAYS_OF_THE_WEEK:
        raise WireError(
            f"DAY_OF_THE_WEEK - Enum doesnt allow value: {day}, allowed values: "
            f"[{', '.join(DAYS_OF_THE_WEEK)}]"
        )
    hour = attributes.get("TIME_OF_THE_DAY")
    if hour is not None and hour not in HOURS:
        raise WireError(
            f"TIME_OF_THE_DAY - Enum doesnt allow value: {hour}, allowed values: ['00'..'23']"
        )
    for name in ("USER_IP_ADDRESS", "USER_AGENT"):
        value = attributes.get(name)
        if value is not None and not isinstance(value, str):
            raise WireError(f"{name} - must be a string")


def validate_events_body(body: Any) -> list[Mapping[str, Any]]:
    """Validate a decoded Track Experience Events body; returns its elements."""
    if not isinstance(body, Mapping):
        raise WireError("body - must be a JSON object")
    elements = body.get("elements")
    if not isinstance(elements, list) or not elements:
        raise WireError("elements - must be a non-empty array")
    validate_elements(elements)
    return elements


def validate_elements(elements: Sequence[Any]) -> None:
    """Validate events elements as the API does (at most 100; each field checked)."""
    if len(elements) > MAX_ELEMENTS:
        raise WireError(f"elements - at most {MAX_ELEMENTS} elements per call, got {len(elements)}")
    for i, element in enumerate(elements):
        _validate_element(element, f"elements[{i}]")


def _validate_element(element: Any, path: str) -> None:
    if not isinstance(element, Mapping):
        raise WireError(f"{path} - must be an object")
    customer_id = element.get("customer_id")
    if not isinstance(customer_id, str) or not customer_id:
        raise WireError(f"{path}.customer_id - must be a non-empty string")
    user_attributes = element.get("user_attributes")
    if user_attributes is not None and not isinstance(user_attributes, Mapping):
        raise WireError(f"{path}.user_attributes - must be an object")
    offset = element.get("user_timezone_offset")
    if offset is not None and (
        not _is_int(offset) or not -MAX_TIMEZONE_OFFSET <= offset <= MAX_TIMEZONE_OFFSET
    ):
        raise WireError(
            f"{path}.user_timezone_offset - must be an integer number of seconds "
            f"-{MAX_TIMEZONE_OFFSET}..{MAX_TIMEZONE_OFFSET}"
        )
    actions = element.get("actions")
    if not isinstance(actions, list) or not actions:
        raise WireError(f"{path}.actions - must be a non-empty array")
    for j, action in enumerate(actions):
        _validate_action(action, f"{path}.actions[{j}]")


def _validate_action(action: Any, path: str) -> None:
    if not isinstance(action, Mapping):
        raise WireError(f"{path} - must be an object")
    if action.get("action") not in ACTIONS:
        raise WireError(
            f"{path}.action - Enum doesnt allow value: {action.get('action')}, "
            f"allowed values: [{', '.join(ACTIONS)}]"
        )
    if not is_uuid4(action.get("moe_event_uuid")):
        raise WireError(f"{path}.moe_event_uuid - must be a UUID v4")
    event_time = action.get("event_time")
    if not _is_int(event_time) or not 0 < event_time < _MAX_EVENT_TIME:
        raise WireError(f"{path}.event_time - must be a Unix time in seconds (not milliseconds)")
    platform = action.get("platform")
    if not isinstance(platform, str) or platform.lower() not in PLATFORMS:
        raise WireError(f"{path}.platform - must be one of {', '.join(PLATFORMS)}")
    attributes = action.get("attributes")
    if not isinstance(attributes, Mapping):
        raise WireError(f"{path}.attributes - must be an object")
    for name in REQUIRED_ATTRIBUTES:
        value = attributes.get(name)
        if not isinstance(value, str) or not value:
            raise WireError(f"{path}.attributes.{name} - required, a non-empty string")
    if attributes["type"] not in EXPERIENCE_TYPES:
        raise WireError(
            f"{path}.attributes.type - Enum doesnt allow value: {attributes['type']}, "
            f"allowed values: [{', '.join(EXPERIENCE_TYPES)}]"
        )
    for where, b_id in (("attributes.b_id", attributes.get("b_id")), ("b_id", action.get("b_id"))):
        if b_id is not None and not isinstance(b_id, str):
            raise WireError(f"{path}.{where} - must be a string")


def is_uuid4(value: Any) -> bool:
    """True for the canonical text of a version-4 UUID."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    return parsed.version == 4 and str(parsed) == value.lower()


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
