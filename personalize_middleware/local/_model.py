"""The validated content of a local experiences file (built by ``_file``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._rules import Rule

__all__ = [
    "EXPERIENCE_TYPE",
    "Audience",
    "ExperienceDefinition",
    "ExperiencesFile",
    "Variation",
]

#: The only ``type`` the API documents for an experience context.
EXPERIENCE_TYPE = "Web Personalization"


@dataclass(frozen=True, slots=True)
class Variation:
    """One variation of an audience: its share of traffic and its payload (wire shape)."""

    id: str
    name: str
    weight: float
    payload: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Audience:
    """One audience of an experience: who matches and which variations they split into."""

    name: str
    id: str
    matches: Rule
    variations: tuple[Variation, ...]


@dataclass(frozen=True, slots=True)
class ExperienceDefinition:
    """One experience of the file."""

    key: str
    name: str
    status: str
    type: str
    experience_type: str | None
    campaign_id: str
    audiences: tuple[Audience, ...]

    def cid(self, audience: Audience) -> str:
        """The campaign id MoEngage puts in ``experience_context.cid`` for an audience."""
        return f"{self.campaign_id}_F_T_WP_AB_{len(audience.variations)}_P_0_AU_{audience.id}"


@dataclass(frozen=True, slots=True)
class ExperiencesFile:
    """A validated local experiences file."""

    source: str
    users: Mapping[str, Mapping[str, Any]]
    experiences: Mapping[str, ExperienceDefinition]

    def find_user(
        self, customer_id: str | None, user_identifiers: Mapping[str, str] | None
    ) -> tuple[str, Mapping[str, Any]] | None:
        """The declared user for an identity: by customer_id, else by any user identifier.

        Mirrors MoEngage's identity resolution: ``user_identifiers`` (``u_em``, ...) are
        matched against the user attributes of the same name.
        """
        if customer_id is not None and customer_id in self.users:
            return customer_id, self.users[customer_id]
        for name, value in (user_identifiers or {}).items():
            for user_id, attributes in self.users.items():
                if attributes.get(name) == value:
                    return user_id, attributes
        return None
