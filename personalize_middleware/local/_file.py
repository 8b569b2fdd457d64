"""The local experiences file: format, loading and strict validation.

A JSON file (or YAML with ``pyyaml`` installed: ``.yaml`` / ``.yml``) describing
experiences the way MoEngage does. The full reference is ``docs/local-experiences.md``;
in short::

    users:                          # optional: customer_id -> user attributes
      alice: {tier: gold, u_em: alice@example.com}
    experiences:
      - key: hero-banner            # what the app asks for
        name: Homepage hero banner
        status: Active              # Active | Paused | Scheduled (only Active is served)
        experience_type: API based Experience   # optional; `type` defaults to
                                                # "Web Personalization"
        audiences:                  # ordered: the first audience whose rules match wins
          - name: Gold members
            id: 5A                  # optional, alphanumeric
            rules: [{user: tier, equals: gold}]   # absent or [] = everyone
            variations:
              - id: "1"             # optional, default 1, 2, ... (moe_variation_id)
                weight: 100         # traffic %; the weights of an audience add up to 100
                payload:
                  Title: {value: Welcome back, data_type: string}

Weights are never normalised silently: either every variation of an audience gives a
``weight`` and they add up to 100, or none does and traffic is split evenly.

Every error is a ``ConfigurationError`` naming the file, the experience and the field::

    experiences.yaml: experience 'hero-banner': audiences[0].variations[1].weight: must be a
    number 0..100
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .._exceptions import ConfigurationError
from .._models import DATA_TYPES, EXPERIENCE_STATUSES, convert_payload_value
from ._model import (
    EXPERIENCE_TYPE,
    Audience,
    ExperienceDefinition,
    ExperiencesFile,
    Variation,
)
from ._rules import FieldError, parse_rules

__all__ = [
    "SAMPLE_FILE",
    "load_experiences_file",
    "load_sample_file",
    "parse_experiences",
    "sample_file_path",
]

#: The packaged sample file (used by ``LocalBackend.default()`` and the CLI).
SAMPLE_FILE = "sample_experiences.json"

_TOP_FIELDS = ("users", "experiences")
_EXPERIENCE_FIELDS = (
    "key",
    "name",
    "status",
    "type",
    "experience_type",
    "campaign_id",
    "audiences",
)
_AUDIENCE_FIELDS = ("name", "id", "rules", "variations")
_VARIATION_FIELDS = ("id", "name", "weight", "payload")
_PAYLOAD_FIELDS = ("value", "data_type")
_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_WEIGHT_TOLERANCE = 1e-6


def load_experiences_file(path: str | os.PathLike[str]) -> ExperiencesFile:
    """Read and validate a local experiences file (``.json``, or ``.yaml`` / ``.yml``).

    Raises ``ConfigurationError`` naming the file, the experience and the field.
    """
    source = os.fspath(path)
    suffix = Path(source).suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigurationError(
            f"{source}: unsupported file type {suffix or '(none)'!r}; use .json, .yaml or .yml",
            field="path",
        )
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigurationError(f"{source}: cannot read the file: {reason}", field="path") from exc
    data = _parse_yaml(text, source) if suffix != ".json" else _parse_json(text, source)
    return parse_experiences(data, source=source)


def load_sample_file() -> ExperiencesFile:
    """The experiences file packaged with the library (used by the example app)."""
    text = resources.files(__package__).joinpath(SAMPLE_FILE).read_text(encoding="utf-8")
    return parse_experiences(_parse_json(text, SAMPLE_FILE), source=SAMPLE_FILE)


def sample_file_path() -> str:
    """The file-system path of the packaged sample file."""
    return str(resources.files(__package__).joinpath(SAMPLE_FILE))


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"{source}: not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}",
            field="file",
        ) from exc
    except RecursionError as exc:
        raise ConfigurationError(f"{source}: not valid JSON: nested too deeply") from exc


def _parse_yaml(text: str, source: str) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise ConfigurationError(
            f"{source}: YAML files need pyyaml: pip install personalize-middleware[yaml] "
            "(or use a .json file)",
            field="path",
        ) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigurationError(
            f"{source}: not valid YAML: {where}{problem}", field="file"
        ) from exc


def parse_experiences(data: Any, *, source: str = "<data>") -> ExperiencesFile:
    """Validate already-parsed file content (a mapping) into an ``ExperiencesFile``."""
    if not isinstance(data, Mapping):
        raise ConfigurationError(
            f"{source}: the top level must be a mapping with an 'experiences' list", field="file"
        )
    for name in data:
        if name not in _TOP_FIELDS:
            raise ConfigurationError(
                f"{source}: {name}: unknown field; expected one of users, experiences",
                field=str(name),
            )
    users = _parse_users(data.get("users"), source)
    raw_experiences = data.get("experiences")
    if not isinstance(raw_experiences, list):
        raise ConfigurationError(
            f"{source}: experiences: must be a list of experiences", field="experiences"
        )
    experiences: dict[str, ExperienceDefinition] = {}
    for index, raw in enumerate(raw_experiences):
        where = f"experiences[{index}]"
        if isinstance(raw, Mapping) and isinstance(raw.get("key"), str) and raw["key"]:
            where = f"experience {raw['key']!r}"
        try:
            experience = _parse_experience(raw)
            if experience.key in experiences:
                raise FieldError("key", "duplicate experience key")
            if any(e.campaign_id == experience.campaign_id for e in experiences.values()):
                # The report maps events back to experiences through the cid.
                raise FieldError("campaign_id", "used by another experience")
        except FieldError as exc:
            field = f"{exc.path}: " if exc.path else ""
            raise ConfigurationError(
                f"{source}: {where}: {field}{exc.message}", field=exc.path or where
            ) from None
        experiences[experience.key] = experience
    return ExperiencesFile(
        source=source, users=MappingProxyType(users), experiences=MappingProxyType(experiences)
    )


def _parse_users(raw: Any, source: str) -> dict[str, Mapping[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigurationError(
            f"{source}: users: must be a mapping of customer_id to attributes", field="users"
        )
    users: dict[str, Mapping[str, Any]] = {}
    for customer_id, attributes in raw.items():
        if not isinstance(customer_id, str) or not customer_id:
            raise ConfigurationError(
                f"{source}: users: customer ids must be non-empty strings "
                f"(quote {customer_id!r} in YAML)",
                field="users",
            )
        if not isinstance(attributes, Mapping) or not all(isinstance(k, str) for k in attributes):
            raise ConfigurationError(
                f"{source}: users.{customer_id}: must be a mapping of attribute names to values",
                field=f"users.{customer_id}",
            )
        users[customer_id] = MappingProxyType(dict(attributes))
    return users


def _parse_experience(raw: Any) -> ExperienceDefinition:
    if not isinstance(raw, Mapping):
        raise FieldError("", "must be a mapping with key, name, status, audiences")
    _check_fields(raw, "", _EXPERIENCE_FIELDS)
    key = _required_text(raw, "key", "")
    if key != key.strip() or len(key) > 255:
        raise FieldError("key", "must not have surrounding spaces or exceed 255 characters")
    name = _required_text(raw, "name", "")
    status = raw.get("status")
    if status not in EXPERIENCE_STATUSES:
        raise FieldError("status", f"must be one of {', '.join(EXPERIENCE_STATUSES)}")
    type_ = raw.get("type", EXPERIENCE_TYPE)
    if type_ != EXPERIENCE_TYPE:
        raise FieldError("type", f"must be {EXPERIENCE_TYPE!r} (the only type the API documents)")
    experience_type = raw.get("experience_type")
    if experience_type is not None and (
        not isinstance(experience_type, str) or not experience_type
    ):
        raise FieldError("experience_type", "must be a non-empty string")
    campaign_id = raw.get(
        "campaign_id", hashlib.sha256(f"campaign:{key}".encode()).hexdigest()[:24]
    )
    if not isinstance(campaign_id, str) or not re.fullmatch(r"[A-Za-z0-9]{1,64}", campaign_id):
        raise FieldError("campaign_id", "must be letters and digits")
    raw_audiences = raw.get("audiences")
    if not isinstance(raw_audiences, list) or not raw_audiences:
        raise FieldError("audiences", "must be a non-empty list of audiences")
    audiences = tuple(
        _parse_audience(item, f"audiences[{i}]", key, i) for i, item in enumerate(raw_audiences)
    )
    seen: set[str] = set()
    for i, audience in enumerate(audiences):
        if audience.id in seen:
            raise FieldError(f"audiences[{i}].id", f"duplicate audience id {audience.id!r}")
        seen.add(audience.id)
    return ExperienceDefinition(
        key=key,
        name=name,
        status=status,
        type=type_,
        experience_type=experience_type,
        campaign_id=campaign_id,
        audiences=audiences,
    )


def _parse_audience(raw: Any, path: str, key: str, index: int) -> Audience:
    if not isinstance(raw, Mapping):
        raise FieldError(path, "must be a mapping with name, rules, variations")
    _check_fields(raw, path, _AUDIENCE_FIELDS)
    name = _required_text(raw, "name", path)
    default_id = hashlib.sha256(f"audience:{key}:{index}".encode()).hexdigest()[:3].upper()
    audience_id = _identifier(raw.get("id", default_id), f"{path}.id")
    matches = parse_rules(raw.get("rules"), f"{path}.rules")
    raw_variations = raw.get("variations")
    if not isinstance(raw_variations, list) or not raw_variations:
        raise FieldError(f"{path}.variations", "must be a non-empty list of variations")
    weights = _weights(raw_variations, f"{path}.variations")
    variations = tuple(
        _parse_variation(item, f"{path}.variations[{i}]", i, weights[i])
        for i, item in enumerate(raw_variations)
    )
    seen: set[str] = set()
    for i, variation in enumerate(variations):
        if variation.id in seen:
            raise FieldError(f"{path}.variations[{i}].id", f"duplicate id {variation.id!r}")
        seen.add(variation.id)
    return Audience(name=name, id=audience_id, matches=matches, variations=variations)


def _weights(raw_variations: list[Any], path: str) -> list[float]:
    given = [isinstance(item, Mapping) and "weight" in item for item in raw_variations]
    if not any(given):
        return [100.0 / len(raw_variations)] * len(raw_variations)
    weights: list[float] = []
    for i, item in enumerate(raw_variations):
        where = f"{path}[{i}].weight"
        if not isinstance(item, Mapping):
            raise FieldError(f"{path}[{i}]", "must be a mapping with weight and payload")
        if "weight" not in item:
            raise FieldError(where, "required when another variation of the audience has one")
        weight = item["weight"]
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or not 0 <= weight <= 100
        ):
            raise FieldError(where, "must be a number 0..100")
        weights.append(float(weight))
    total = sum(weights)
    if abs(total - 100.0) > _WEIGHT_TOLERANCE:
        raise FieldError(path, f"weights must add up to 100 (they add up to {total:g})")
    return weights


def _parse_variation(raw: Any, path: str, index: int, weight: float) -> Variation:
    if not isinstance(raw, Mapping):
        raise FieldError(path, "must be a mapping with weight and payload")
    _check_fields(raw, path, _VARIATION_FIELDS)
    variation_id = _identifier(raw.get("id", str(index + 1)), f"{path}.id")
    name = raw.get("name", f"Variation {variation_id}")
    if not isinstance(name, str) or not name:
        raise FieldError(f"{path}.name", "must be a non-empty string")
    raw_payload = raw.get("payload", {})
    if not isinstance(raw_payload, Mapping):
        raise FieldError(f"{path}.payload", "must be a mapping of variable name to value")
    payload = {
        _variable_name(var, f"{path}.payload"): _wire_value(item, f"{path}.payload.{var}")
        for var, item in raw_payload.items()
    }
    return Variation(id=variation_id, name=name, weight=weight, payload=MappingProxyType(payload))


def _variable_name(name: Any, path: str) -> str:
    if not isinstance(name, str) or not name:
        raise FieldError(path, f"variable names must be non-empty strings, got {name!r}")
    return name


def _wire_value(raw: Any, path: str) -> Mapping[str, Any]:
    """Check a ``{value, data_type}`` entry converts, and give its wire shape.

    The API sends scalar values as strings and JSON as an object (its schema allows only a
    string or an object), so that is what the local engine sends too.
    """
    if not isinstance(raw, Mapping) or "value" not in raw:
        raise FieldError(path, "must be a mapping with value and data_type")
    _check_fields(raw, path, _PAYLOAD_FIELDS)
    data_type = raw.get("data_type")
    if data_type not in DATA_TYPES:
        raise FieldError(f"{path}.data_type", f"must be one of {', '.join(DATA_TYPES)}")
    try:
        value = convert_payload_value(raw["value"], data_type)
    except (ValueError, TypeError) as exc:
        raise FieldError(f"{path}.value", f"does not convert to {data_type}: {exc}") from None
    wire: Any
    if data_type == "boolean":
        wire = "true" if value else "false"
    elif data_type == "json":
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise FieldError(f"{path}.value", f"is not plain JSON: {exc}") from None
        wire = dict(value) if isinstance(value, dict) else text
    else:
        wire = str(value)
    return MappingProxyType({"value": wire, "data_type": data_type})


def _check_fields(raw: Mapping[Any, Any], path: str, allowed: tuple[str, ...]) -> None:
    for name in raw:
        if name not in allowed:
            where = f"{path}.{name}" if path else str(name)
            raise FieldError(where, "unknown field; expected one of " + ", ".join(allowed))


def _required_text(raw: Mapping[str, Any], name: str, path: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value.strip():
        raise FieldError(f"{path}.{name}" if path else name, "must be a non-empty string")
    return value


def _identifier(value: Any, path: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # `id: 2` in YAML is the obvious way to write it
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise FieldError(path, "must be letters, digits, '_' or '-' (at most 64)")
    return value
