"""Typed results: payload conversion, experiences, metadata, identities."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from personalize_middleware import Experience, ExperienceMetadata, Identity
from personalize_middleware._models import DATA_TYPES, convert_payload_value

UNCONVERTIBLE = object()

CONVERSIONS: list[tuple[str, Any, Any]] = [
    # string
    ("string", "Free shipping", "Free shipping"),
    ("string", "", ""),
    ("string", 5, "5"),
    ("string", 1.5, "1.5"),
    ("string", True, UNCONVERTIBLE),
    ("string", None, UNCONVERTIBLE),
    ("string", {"a": 1}, UNCONVERTIBLE),
    ("string", ["a"], UNCONVERTIBLE),
    # number: int when it is one, else float
    ("number", 5, 5),
    ("number", "5", 5),
    ("number", " 7 ", 7),
    ("number", "-12", -12),
    ("number", "1.5", 1.5),
    ("number", 2.5, 2.5),
    ("number", "1e3", 1000.0),
    ("number", "abc", UNCONVERTIBLE),
    ("number", "", UNCONVERTIBLE),
    ("number", True, UNCONVERTIBLE),
    ("number", "nan", UNCONVERTIBLE),
    ("number", "inf", UNCONVERTIBLE),
    ("number", float("inf"), UNCONVERTIBLE),
    ("number", None, UNCONVERTIBLE),
    ("number", [1], UNCONVERTIBLE),
    # float: always a float
    ("float", "1.5", 1.5),
    ("float", 2, 2.0),
    ("float", "3", 3.0),
    ("float", 0.25, 0.25),
    ("float", "x", UNCONVERTIBLE),
    ("float", False, UNCONVERTIBLE),
    ("float", "-inf", UNCONVERTIBLE),
    ("float", 10**400, UNCONVERTIBLE),  # regression: raised OverflowError, not ValueError
    ("float", {}, UNCONVERTIBLE),
    # boolean: real booleans and "true"/"false" strings
    ("boolean", True, True),
    ("boolean", False, False),
    ("boolean", "true", True),
    ("boolean", "FALSE", False),
    ("boolean", " True ", True),
    ("boolean", "yes", UNCONVERTIBLE),
    ("boolean", 1, UNCONVERTIBLE),
    ("boolean", 0, UNCONVERTIBLE),
    ("boolean", None, UNCONVERTIBLE),
    # json: an object/array, or a JSON string holding one
    ("json", {"a": [1, 2]}, {"a": [1, 2]}),
    ("json", [1, "two"], [1, "two"]),
    ("json", '{"a": {"b": true}}', {"a": {"b": True}}),
    ("json", "[1, 2]", [1, 2]),
    ("json", '"just a string"', UNCONVERTIBLE),
    ("json", "42", UNCONVERTIBLE),
    ("json", "{not json", UNCONVERTIBLE),
    ("json", "[" * 100_000, UNCONVERTIBLE),
    ("json", 42, UNCONVERTIBLE),
    ("json", None, UNCONVERTIBLE),
    # an unknown data type never guesses
    ("date", "2024-01-01", UNCONVERTIBLE),
    ("", "x", UNCONVERTIBLE),
]


@pytest.mark.parametrize(
    ("data_type", "value", "expected"),
    CONVERSIONS,
    ids=[f"{t or 'empty'}-{v!r:.24}" for t, v, _ in CONVERSIONS],
)
def test_convert_payload_value(data_type: str, value: Any, expected: Any) -> None:
    if expected is UNCONVERTIBLE:
        with pytest.raises(ValueError):
            convert_payload_value(value, data_type)
        return
    converted = convert_payload_value(value, data_type)
    assert converted == expected
    assert type(converted) is type(expected)  # 1 vs 1.0 vs True matter to templates


def test_every_documented_data_type_is_covered() -> None:
    assert {row[0] for row in CONVERSIONS} >= set(DATA_TYPES)


CONTEXT = {
    "cid": "65eae5738ea5032b0ef60138_F_T_WP_AB_2_P_0_AU_42D",
    "experience": "Homepage Banner",
    "moe_locale_id": "0",
    "moe_variation_id": "2",
    "audience_name": "High Intent Users",
    "audience_id": "42D",
    "type": "Web Personalization",
    "experience_type": "API based Experience",
    "some_future_field": {"nested": [1, 2]},
}


def test_experience_converts_by_data_type_and_keeps_context_whole() -> None:
    raw = {
        "payload": {
            "Title": {"value": "Hello", "data_type": "string"},
            "Count": {"value": "3", "data_type": "number"},
            "Ratio": {"value": "0.5", "data_type": "float"},
            "Show": {"value": "true", "data_type": "boolean"},
            "Config": {"value": '{"color": "red"}', "data_type": "json"},
            "NoType": {"value": "plain"},
        },
        "experience_context": CONTEXT,
    }
    experience = Experience.from_api("homepage-banner", raw)
    assert experience.key == "homepage-banner"
    assert dict(experience.payload) == {
        "Title": "Hello",
        "Count": 3,
        "Ratio": 0.5,
        "Show": True,
        "Config": {"color": "red"},
        "NoType": "plain",
    }
    assert dict(experience.experience_context) == CONTEXT  # unknown fields included
    assert experience.variation_id == "2"
    assert experience.to_api() == raw
    assert json.loads(json.dumps(experience.to_api())) == raw


def test_experience_is_a_snapshot() -> None:
    raw = {"payload": {"T": {"value": "a", "data_type": "string"}}, "experience_context": {}}
    context: dict[str, Any] = dict(CONTEXT)
    raw["experience_context"] = context
    experience = Experience.from_api("k", raw)
    context["cid"] = "changed"
    assert experience.experience_context["cid"] == CONTEXT["cid"]
    with pytest.raises(TypeError):
        experience.experience_context["cid"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        experience.payload["T"] = "x"  # type: ignore[index]


def test_unconvertible_values_are_absent_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    raw = {
        "payload": {
            "Good": {"value": "7", "data_type": "number"},
            "BadNumber": {"value": "seven", "data_type": "number"},
            "BadJson": {"value": "{oops", "data_type": "json"},
            "NoValue": {"data_type": "string"},
            "NotAnItem": "just a string",
        },
        "experience_context": CONTEXT,
    }
    with caplog.at_level(logging.WARNING, logger="personalize_middleware"):
        experience = Experience.from_api("promo", raw)
    assert dict(experience.payload) == {"Good": 7}
    assert experience.get("BadNumber", "the default") == "the default"
    assert "BadNumber" not in experience and "Good" in experience
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("BadNumber", "BadJson", "NoValue", "NotAnItem"):
        assert name in warned
    assert "Good" not in warned
    assert experience.raw_payload["BadNumber"] == {"value": "seven", "data_type": "number"}


def test_experience_accepts_missing_or_null_parts() -> None:
    assert Experience.from_api("k", {}).payload == {}
    assert Experience.from_api("k", {"payload": None}).experience_context == {}
    assert Experience.from_api("k", {}).variation_id is None


@pytest.mark.parametrize(
    "data",
    [None, "x", [], {"payload": []}, {"payload": "x"}, {"experience_context": ["cid"]}],
)
def test_experience_wrong_shape_raises_value_error(data: Any) -> None:
    with pytest.raises(ValueError):
        Experience.from_api("k", data)


def test_metadata_parsing() -> None:
    entry = ExperienceMetadata.from_api(
        {"experience_name": "Cart Upsell", "experience_key": "cart-upsell", "status": "Paused"}
    )
    assert entry == ExperienceMetadata(key="cart-upsell", name="Cart Upsell", status="Paused")
    assert not entry.is_active
    assert ExperienceMetadata.from_api({"experience_key": "k", "status": "Active"}).is_active
    lenient = ExperienceMetadata.from_api(
        {"experience_key": "k", "experience_name": None, "status": None}
    )
    assert (lenient.name, lenient.status) == ("", "")


@pytest.mark.parametrize("data", [None, [], "k", {}, {"experience_key": ""}, {"experience_key": 5}])
def test_metadata_wrong_shape_raises_value_error(data: Any) -> None:
    with pytest.raises(ValueError):
        ExperienceMetadata.from_api(data)


def test_identity_cache_keys_are_distinct() -> None:
    identities = [
        Identity(customer_id="x"),
        Identity(visitor_id="x"),
        Identity(customer_id="u:x"),
        Identity(customer_id='{"u_em": "x"}'),
        Identity(user_identifiers={"u_em": "x"}),
        Identity(user_identifiers={"u_mb": "x"}),
        Identity(user_identifiers={"u_em": "x", "u_mb": "y"}),
        Identity(customer_id=""),
        Identity(),
    ]
    keys = [identity.cache_key for identity in identities]
    assert len(set(keys)) == len(keys), keys


def test_identity_cache_key_ignores_identifier_order() -> None:
    a = Identity(user_identifiers={"u_em": "x", "u_mb": "y"})
    b = Identity(user_identifiers={"u_mb": "y", "u_em": "x"})
    assert a.cache_key == b.cache_key


def test_identity_customer_id_wins_over_visitor() -> None:
    assert Identity(customer_id="c", visitor_id="v").api_customer_id == "c"
    assert Identity(visitor_id="v").api_customer_id == "v"
    assert Identity(visitor_id="v").is_anonymous
    assert Identity(user_identifiers={"u_em": "e"}, visitor_id="v").api_customer_id is None
    assert not Identity(user_identifiers={"u_em": "e"}).is_anonymous


# -- properties ------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
DATA_TYPE_NAMES = st.sampled_from(DATA_TYPES) | st.text(max_size=10)
# Strings that look like what the API sends for each type, so conversion paths get hit.
NUMERIC_LOOKING = st.from_regex(r"\A\s?-?[0-9]{1,6}(\.[0-9]{0,4})?([eE]-?[0-9]{1,3})?\s?\Z")
# JSON ints can be far beyond float range; json.loads keeps them exact.
HUGE_INTS = st.integers(min_value=10**300, max_value=10**400).map(lambda n: n * (-1) ** n)
EDGE_CASES = st.sampled_from(["true", "False", "{}", "[1]", '"s"', "1e400", "-0", 2**63])
VALUES = JSON_VALUES | NUMERIC_LOOKING | HUGE_INTS | EDGE_CASES


@settings(max_examples=150, deadline=None)
@given(value=VALUES, data_type=DATA_TYPE_NAMES)
def test_convert_payload_value_raises_only_value_or_type_error(value: Any, data_type: str) -> None:
    with contextlib.suppress(ValueError, TypeError):  # anything else fails the test
        convert_payload_value(value, data_type)


@settings(max_examples=100, deadline=None)
@given(
    payload=st.dictionaries(
        st.text(max_size=8),
        st.fixed_dictionaries({}, optional={"value": VALUES, "data_type": DATA_TYPE_NAMES})
        | JSON_VALUES,
        max_size=6,
    ),
    context=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5),
)
def test_experience_from_api_never_raises_on_payload_values(
    payload: dict[str, Any], context: dict[str, Any]
) -> None:
    experience = Experience.from_api("k", {"payload": payload, "experience_context": context})
    assert set(experience.payload) <= set(payload)
    assert dict(experience.experience_context) == context
