"""Evaluating a local experiences file the way MoEngage evaluates a fetch.

For each requested key: unknown, Paused and Scheduled experiences are absent; otherwise
the first audience whose rules match the user wins, and the user's variation within it is
chosen by a sticky hash of (identity, experience key) into the variations' weight buckets.
The answer is the wire shape of Fetch Experience's ``experiences`` object.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from ._model import Audience, ExperienceDefinition, ExperiencesFile, Variation
from ._rules import MatchContext

__all__ = ["bucket", "evaluate", "identity_for_bucketing"]

_LOCALE_ID = "0"


def identity_for_bucketing(
    experiences: ExperiencesFile,
    customer_id: str | None,
    user_identifiers: Mapping[str, str] | None,
) -> str:
    """The string a user's variations are hashed from.

    The declared user's customer id when the identity resolves to one, else the customer id
    as sent, else the user identifiers (canonical JSON), else empty (anonymous).
    """
    found = experiences.find_user(customer_id, user_identifiers)
    if found is not None:
        return "c:" + found[0]
    if customer_id is not None:
        return "c:" + customer_id
    if user_identifiers:
        return "u:" + json.dumps(dict(user_identifiers), sort_keys=True)
    return ""


def bucket(identity: str, experience_key: str) -> float:
    """A deterministic position in [0, 100) for (identity, key).

    sha256 rather than ``hash()``: Python's string hash is salted per process, and a
    variation must stay the same across restarts and machines.
    """
    digest = hashlib.sha256(f"{identity}\x1f{experience_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def evaluate(
    experiences: ExperiencesFile,
    keys: Iterable[str] | None,
    *,
    customer_id: str | None = None,
    user_identifiers: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fetch Experience's ``experiences`` object for one user.

    ``keys`` None or empty means every experience (as when ``experience_key`` is omitted).
    """
    found = experiences.find_user(customer_id, user_identifiers)
    context = MatchContext(
        user=found[1] if found is not None else {},
        identified=found is not None,
        session=attributes or {},
    )
    identity = identity_for_bucketing(experiences, customer_id, user_identifiers)
    wanted = list(dict.fromkeys(keys or ())) or list(experiences.experiences)
    result: dict[str, dict[str, Any]] = {}
    for key in wanted:
        definition = experiences.experiences.get(key)
        if definition is None or definition.status != "Active":
            continue
        audience = next((a for a in definition.audiences if a.matches(context)), None)
        if audience is None:
            continue
        variation = _choose_variation(audience, bucket(identity, key))
        result[key] = {
            "payload": {name: dict(item) for name, item in variation.payload.items()},
            "experience_context": experience_context(definition, audience, variation),
        }
    return result


def experience_context(
    definition: ExperienceDefinition, audience: Audience, variation: Variation
) -> dict[str, str]:
    """The ``experience_context`` MoEngage returns for this experience, audience and variation."""
    context = {
        "cid": definition.cid(audience),
        "experience": definition.name,
        "moe_locale_id": _LOCALE_ID,
        "moe_variation_id": variation.id,
        "audience_name": audience.name,
        "audience_id": audience.id,
        "type": definition.type,
    }
    if definition.experience_type is not None:
        context["experience_type"] = definition.experience_type
    return context


def _choose_variation(audience: Audience, position: float) -> Variation:
    cumulative = 0.0
    for variation in audience.variations:
        cumulative += variation.weight
        if position < cumulative:
            return variation
    # Rounding can leave a sliver above the last boundary: it belongs to the last
    # variation that takes traffic at all.
    return next(v for v in reversed(audience.variations) if v.weight > 0)
