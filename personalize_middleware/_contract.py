"""The wire contract of the Personalize API that the HTTP client and the local engine
share: batch limits and the validated request fields (WIRE.md is the reference).

Kept apart from ``upstream`` because the local backend and the MoEngage-compatible local
server speak the same contract without any HTTP client.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ._exceptions import ConfigurationError
from ._models import EXPERIENCE_STATUSES

__all__ = [
    "EVENTS_BATCH_SIZE",
    "FETCH_BATCH_SIZE",
    "RESERVED_BODY_FIELDS",
    "attributes_body",
    "identifiers_body",
    "statuses_query",
    "unique_keys",
]

#: The API answers only the first 25 keys of a fetch; more are split into several calls.
FETCH_BATCH_SIZE = 25
#: The events API takes at most 100 elements (users) a call.
EVENTS_BATCH_SIZE = 100
#: Body fields the client itself writes; an in-session attribute may not overwrite them.
RESERVED_BODY_FIELDS = frozenset({"identifiers", "experience_key"})


def unique_keys(keys: Iterable[str]) -> list[str]:
    if isinstance(keys, str | bytes):
        raise ConfigurationError(
            "keys must be an iterable of experience keys, not a single string", field="keys"
        )
    unique = list(dict.fromkeys(keys))
    for key in unique:
        if not isinstance(key, str) or not key:
            raise ConfigurationError(
                f"experience keys must be non-empty strings, got {key!r}", field="keys"
            )
    return unique


def identifiers_body(
    customer_id: str | None, user_identifiers: Mapping[str, str] | None
) -> dict[str, Any]:
    identifiers: dict[str, Any] = {}
    if customer_id is not None:
        if not isinstance(customer_id, str) or not customer_id:
            raise ConfigurationError("customer_id must be a non-empty string", field="customer_id")
        identifiers["customer_id"] = customer_id
    if user_identifiers:
        if not isinstance(user_identifiers, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in user_identifiers.items()
        ):
            raise ConfigurationError(
                "user_identifiers must map identifier names to strings, e.g. {'u_em': 'a@b.c'}",
                field="user_identifiers",
            )
        # WIRE.md: the spec types this as a string, but the API takes an object.
        identifiers["user_identifiers"] = dict(user_identifiers)
    if not identifiers:
        raise ConfigurationError(
            "fetch_experiences needs customer_id or user_identifiers", field="customer_id"
        )
    return identifiers


def attributes_body(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    if not attributes:
        return {}
    if not isinstance(attributes, Mapping):
        raise ConfigurationError("attributes must be a mapping", field="attributes")
    for name in attributes:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"attribute names must be non-empty strings, got {name!r}", field="attributes"
            )
        if name in RESERVED_BODY_FIELDS:
            raise ConfigurationError(
                f"attribute name {name!r} is reserved by the Fetch Experience body",
                field="attributes",
            )
    return dict(attributes)


def statuses_query(statuses: Iterable[str] | None) -> list[str]:
    if statuses is None:
        return []
    if isinstance(statuses, str):
        statuses = [s.strip() for s in statuses.split(",") if s.strip()]
    wanted = list(dict.fromkeys(statuses))
    for status in wanted:
        if status not in EXPERIENCE_STATUSES:
            raise ConfigurationError(
                f"unknown experience status {status!r}: use "
                f"{', '.join(EXPERIENCE_STATUSES)} (case-sensitive)",
                field="statuses",
            )
    return wanted
