"""Audience rules of the local experiences file: parsing (strict) and matching.

A rule is a mapping with one *subject* key; see ``docs/local-experiences.md``::

    {"user": "tier", "in": ["gold", "platinum"]}     user attribute from the file's users
    {"session": "utm_medium", "equals": "email"}     in-session attribute sent with the fetch
    {"day_of_week": ["Saturday", "Sunday"]}          DAY_OF_THE_WEEK
    {"hour": {"gte": 9, "lt": 17}}                   TIME_OF_THE_DAY (UTC hour)
    {"device": "mobile"}                             derived from USER_AGENT (its first
                                                     MAX_USER_AGENT_CHARS characters)
    {"identified": true}                             the user is declared in the file
    {"all": [...]}, {"any": [...]}, {"not": {...}}   combinators

A list of rules means "all of them".
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DAYS_OF_THE_WEEK",
    "DEVICE_TYPES",
    "MAX_USER_AGENT_CHARS",
    "OPERATORS",
    "FieldError",
    "MatchContext",
    "Rule",
    "device_type",
    "parse_rules",
]

DAYS_OF_THE_WEEK: tuple[str, ...] = (
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
)
DEVICE_TYPES: tuple[str, ...] = ("mobile", "tablet", "desktop")
OPERATORS: tuple[str, ...] = (
    "equals",
    "not_equals",
    "in",
    "not_in",
    "exists",
    "contains",
    "starts_with",
    "gt",
    "gte",
    "lt",
    "lte",
)
_NUMERIC_OPERATORS = ("gt", "gte", "lt", "lte")
_SUBJECTS = ("user", "session", "day_of_week", "hour", "device", "identified", "all", "any", "not")

#: Only the start of a User-Agent is classified: real ones are 100-300 characters, and the
#: middleware itself sends at most 512.
MAX_USER_AGENT_CHARS = 512

# These run on request data, so each must take time linear in its input: alternations of
# plain words, and no quantifier that can be retried from many places.
# Order matters: tablets announce "Android" too, and iPads may say "Mobile".
_TABLET_RE = re.compile(r"iPad|Tablet|PlayBook|Silk|Kindle", re.IGNORECASE)
# An "Android" that no "Mobile" follows on its line. The last "Android" of a line decides
# (if any qualifies, the last does), and the atomic group goes straight to it and never
# backtracks to an earlier one: ``Android(?!.*Mobile)`` rescanned the rest of the line from
# every "Android", quadratic in a crafted User-Agent (5.6 s for 224 KB).
_ANDROID_TABLET_RE = re.compile(r"^(?>.*Android)(?!.*Mobile)", re.IGNORECASE | re.MULTILINE)
_MOBILE_RE = re.compile(r"Mobi|iPhone|iPod|Android|Windows Phone|BlackBerry|Opera Mini", re.I)


class FieldError(ValueError):
    """A file field is invalid; ``path`` is the field's dotted path within its experience."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class MatchContext:
    """What an audience rule can look at for one fetch."""

    user: Mapping[str, Any] = field(default_factory=dict)
    identified: bool = False
    session: Mapping[str, Any] = field(default_factory=dict)


Rule = Callable[[MatchContext], bool]


def device_type(user_agent: str | None) -> str | None:
    """``mobile``, ``tablet`` or ``desktop`` for a User-Agent; ``None`` when there is none.

    Only the first ``MAX_USER_AGENT_CHARS`` characters are looked at.
    """
    if not user_agent:
        return None
    return _classify(user_agent[:MAX_USER_AGENT_CHARS])


@functools.lru_cache(maxsize=256)  # a fetch meets a device rule in many experiences
def _classify(user_agent: str) -> str:
    if _TABLET_RE.search(user_agent) or _ANDROID_TABLET_RE.search(user_agent):
        return "tablet"
    if _MOBILE_RE.search(user_agent):
        return "mobile"
    return "desktop"


def parse_rules(raw: Any, path: str) -> Rule:
    """Compile ``rules`` (a list, a single rule mapping, or absent) into one predicate."""
    if raw is None:
        return _always
    if isinstance(raw, list):
        return _all_of([_parse_rule(item, f"{path}[{i}]") for i, item in enumerate(raw)])
    return _parse_rule(raw, path)


def _always(_: MatchContext) -> bool:
    return True


def _all_of(rules: Sequence[Rule]) -> Rule:
    return lambda ctx: all(rule(ctx) for rule in rules)


def _any_of(rules: Sequence[Rule]) -> Rule:
    return lambda ctx: any(rule(ctx) for rule in rules)


def _parse_rule(raw: Any, path: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise FieldError(path, "a rule must be a mapping such as {user: tier, equals: gold}")
    subjects = [key for key in raw if key in _SUBJECTS]
    if len(subjects) != 1:
        raise FieldError(
            path,
            "a rule needs exactly one of "
            + ", ".join(_SUBJECTS)
            + f" (got {sorted(map(str, raw))})",
        )
    subject = subjects[0]
    value = raw[subject]
    sub = f"{path}.{subject}"
    if subject in ("user", "session"):
        return _parse_attribute_rule(subject, raw, path)
    _no_extra_keys(raw, path, allowed=(subject,))
    if subject in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise FieldError(sub, "must be a non-empty list of rules")
        rules = [_parse_rule(item, f"{sub}[{i}]") for i, item in enumerate(value)]
        return _all_of(rules) if subject == "all" else _any_of(rules)
    if subject == "not":
        inner = _parse_rule(value, sub)
        return lambda ctx: not inner(ctx)
    if subject == "identified":
        if not isinstance(value, bool):
            raise FieldError(sub, "must be true or false")
        return lambda ctx: ctx.identified is value
    if subject == "day_of_week":
        days = _one_or_many(value, sub, DAYS_OF_THE_WEEK, "a day name (Monday..Sunday)")
        return lambda ctx: ctx.session.get("DAY_OF_THE_WEEK") in days
    if subject == "device":
        devices = _one_or_many(value, sub, DEVICE_TYPES, "mobile, tablet or desktop")
        return lambda ctx: device_type(_str_or_none(ctx.session.get("USER_AGENT"))) in devices
    return _parse_hour_rule(value, sub)


def _parse_attribute_rule(subject: str, raw: Mapping[str, Any], path: str) -> Rule:
    name = raw[subject]
    if not isinstance(name, str) or not name:
        raise FieldError(f"{path}.{subject}", "must be a non-empty attribute name")
    _no_extra_keys(raw, path, allowed=(subject, *OPERATORS))
    checks = [_parse_operator(op, raw[op], f"{path}.{op}") for op in OPERATORS if op in raw]
    if not checks:
        raise FieldError(path, "needs an operator: " + ", ".join(OPERATORS))

    def source(ctx: MatchContext) -> Mapping[str, Any]:
        return ctx.user if subject == "user" else ctx.session

    return lambda ctx: all(check(source(ctx), name) for check in checks)


Check = Callable[[Mapping[str, Any], str], bool]


def _parse_operator(op: str, expected: Any, path: str) -> Check:
    if op == "exists":
        if not isinstance(expected, bool):
            raise FieldError(path, "must be true or false")
        return lambda attrs, name: (attrs.get(name) is not None) is expected
    if op in ("in", "not_in"):
        if not isinstance(expected, list) or not all(_is_scalar(v) for v in expected):
            raise FieldError(path, "must be a list of strings, numbers or booleans")
        negate = op == "not_in"
        return lambda attrs, name: (
            _present(attrs, name)
            and (any(_loosely_equal(attrs[name], v) for v in expected) is not negate)
        )
    if op in _NUMERIC_OPERATORS:
        if not _is_number(expected):
            raise FieldError(path, "must be a number")
        compare = _COMPARATORS[op]
        return lambda attrs, name: _compare_number(attrs.get(name), expected, compare)
    if not _is_scalar(expected):
        raise FieldError(path, "must be a string, number or boolean")
    if op == "equals":
        return lambda attrs, name: _present(attrs, name) and _loosely_equal(attrs[name], expected)
    if op == "not_equals":
        return lambda attrs, name: (
            _present(attrs, name) and not _loosely_equal(attrs[name], expected)
        )
    if not isinstance(expected, str):
        raise FieldError(path, "must be a string")
    if op == "contains":
        return lambda attrs, name: _contains(attrs.get(name), expected)
    return lambda attrs, name: isinstance(attrs.get(name), str) and attrs[name].startswith(expected)


_COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _parse_hour_rule(value: Any, path: str) -> Rule:
    # Hours are 0..23, so every hour rule is compiled down to the set of hours it accepts.
    if isinstance(value, Mapping):
        allowed = ("equals", "in", *_NUMERIC_OPERATORS)
        _no_extra_keys(value, path, allowed=allowed)
        if not value:
            raise FieldError(path, "needs one of " + ", ".join(allowed))
        hours = set(range(24))
        for op, expected in value.items():
            if op == "in":
                hours &= set(_hours(expected, f"{path}.in"))
            elif op == "equals":
                hours &= {_hour(expected, f"{path}.equals")}
            else:
                bound, compare = _hour(expected, f"{path}.{op}"), _COMPARATORS[op]
                hours = {hour for hour in hours if compare(hour, bound)}
    else:
        hours = set(_hours(value, path))
    accepted = frozenset(hours)
    return lambda ctx: _session_hour(ctx.session.get("TIME_OF_THE_DAY")) in accepted


def _hours(value: Any, path: str) -> list[int]:
    if not isinstance(value, list):
        return [_hour(value, path)]
    if not value:
        raise FieldError(path, "must not be empty")
    return [_hour(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _hour(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 23:
        raise FieldError(path, "must be an hour 0..23 (UTC)")
    return value


def _session_hour(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit() and len(value) <= 2:
        hour = int(value)
        return hour if 0 <= hour <= 23 else None
    return None


def _one_or_many(value: Any, path: str, allowed: tuple[str, ...], what: str) -> frozenset[str]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise FieldError(path, f"must be {what} or a non-empty list of them")
    for i, item in enumerate(items):
        if item not in allowed:
            where = f"{path}[{i}]" if isinstance(value, list) else path
            raise FieldError(where, f"must be {what}, got {item!r}")
    return frozenset(items)


def _no_extra_keys(raw: Mapping[str, Any], path: str, *, allowed: tuple[str, ...]) -> None:
    for key in raw:
        if key not in allowed:
            raise FieldError(
                f"{path}.{key}", "unknown field; expected one of " + ", ".join(allowed)
            )


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (not isinstance(value, float) or math.isfinite(value))
    )


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | bool) or _is_number(value)


def _present(attrs: Mapping[str, Any], name: str) -> bool:
    return attrs.get(name) is not None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _as_number(value: Any) -> float | None:
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _loosely_equal(actual: Any, expected: Any) -> bool:
    """Equality that survives the trip through a query string: ``"3" == 3``, ``"true" == True``.

    Strings compare case-sensitively, as MoEngage compares in-session values.
    """
    if isinstance(expected, bool) or isinstance(actual, bool):
        as_text = {True: "true", False: "false"}
        left = as_text[actual] if isinstance(actual, bool) else str(actual).strip().lower()
        right = as_text[expected] if isinstance(expected, bool) else str(expected).strip().lower()
        return left == right
    if _is_number(expected) or _is_number(actual):
        left_n, right_n = _as_number(actual), _as_number(expected)
        return left_n is not None and left_n == right_n
    return isinstance(actual, str) and actual == expected


def _compare_number(actual: Any, expected: float, compare: Callable[[float, float], bool]) -> bool:
    number = _as_number(actual)
    return number is not None and compare(number, float(expected))


def _contains(actual: Any, expected: str) -> bool:
    if isinstance(actual, str):
        return expected in actual
    if isinstance(actual, list):
        return any(_loosely_equal(item, expected) for item in actual)
    return False
