"""Evaluation of local experiences: sticky variations, weights, audience rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from personalize_middleware.local import (
    ExperiencesFile,
    bucket,
    device_type,
    evaluate,
    load_sample_file,
    parse_experiences,
)

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1"
)
ANDROID_PHONE = (
    "Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Mobile Safari/537.36"
)
ANDROID_TABLET = (
    "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
IPAD = (
    "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.0 Mobile/15E148 Safari/604.1"
)
DESKTOP = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)


def one_audience(rules: Any, *, status: str = "Active") -> ExperiencesFile:
    """A file with one experience 'x' whose single audience has ``rules``."""
    return parse_experiences(
        {
            "users": {
                "alice": {"tier": "gold", "orders": 12, "u_em": "alice@example.com"},
                "bob": {"tier": "silver", "orders": "2", "tags": ["vip", "beta"]},
            },
            "experiences": [
                {
                    "key": "x",
                    "name": "X",
                    "status": status,
                    "audiences": [
                        {
                            "name": "Target",
                            "id": "9Z",
                            "rules": rules,
                            "variations": [
                                {"payload": {"T": {"value": "hi", "data_type": "string"}}}
                            ],
                        }
                    ],
                }
            ],
        }
    )


def matches(rules: Any, customer_id: str | None = "someone", **session: Any) -> bool:
    result = evaluate(one_audience(rules), ["x"], customer_id=customer_id, attributes=session)
    return "x" in result


def split_file(weights: list[float]) -> ExperiencesFile:
    return parse_experiences(
        {
            "experiences": [
                {
                    "key": "ab",
                    "name": "AB",
                    "status": "Active",
                    "audiences": [
                        {
                            "name": "All",
                            "variations": [
                                {"id": str(i + 1), "weight": w, "payload": {}}
                                for i, w in enumerate(weights)
                            ],
                        }
                    ],
                }
            ]
        }
    )


def variation_of(file: ExperiencesFile, customer_id: str) -> str:
    context = evaluate(file, ["ab"], customer_id=customer_id)["ab"]["experience_context"]
    return str(context["moe_variation_id"])


def test_bucket_is_sha256_based_and_pinned() -> None:
    # Pinned: a change here re-shuffles every user of every deployment.
    assert bucket("c:alice", "hero-banner") == pytest.approx(8.901071458885045)
    assert bucket("", "hero-banner") == pytest.approx(10.065445623181164)
    assert 0 <= bucket("c:bob", "x") < 100


def test_variation_is_sticky_per_identity_and_key() -> None:
    file = split_file([50, 50])
    first = {cid: variation_of(file, cid) for cid in (f"user-{i}" for i in range(200))}
    again = {cid: variation_of(file, cid) for cid in first}
    assert first == again
    assert set(first.values()) == {"1", "2"}  # both variations are actually served


def test_variation_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import json; from personalize_middleware.local import load_sample_file, evaluate; "
        "f = load_sample_file(); "
        "print(json.dumps({c: evaluate(f, ['hero-banner', 'product-upsell'], customer_id=c)"
        " for c in ['dave', 'erin', 'frank', 'gina']}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    sample = load_sample_file()
    here = {
        c: evaluate(sample, ["hero-banner", "product-upsell"], customer_id=c)
        for c in ["dave", "erin", "frank", "gina"]
    }
    assert json.loads(out) == here


def test_weights_split_traffic_roughly_as_configured() -> None:
    file = split_file([20, 30, 50])
    counts = Counter(variation_of(file, f"visitor-{i}") for i in range(10_000))
    assert counts["1"] / 10_000 == pytest.approx(0.20, abs=0.02)
    assert counts["2"] / 10_000 == pytest.approx(0.30, abs=0.02)
    assert counts["3"] / 10_000 == pytest.approx(0.50, abs=0.02)


def test_zero_weight_variation_is_never_served() -> None:
    file = split_file([0, 100])
    assert {variation_of(file, f"v{i}") for i in range(500)} == {"2"}


def test_experience_context_has_moengage_shape() -> None:
    result = evaluate(load_sample_file(), ["hero-banner"], customer_id="alice")
    context = result["hero-banner"]["experience_context"]
    assert set(context) == {
        "cid",
        "experience",
        "moe_locale_id",
        "moe_variation_id",
        "audience_name",
        "audience_id",
        "type",
        "experience_type",
    }
    assert context["experience"] == "Homepage hero banner"
    assert context["moe_locale_id"] == "0"
    assert context["audience_name"] == "Gold members"
    assert context["audience_id"] == "5A"
    assert context["type"] == "Web Personalization"
    assert context["experience_type"] == "API based Experience"
    # Like "66d55ae445921e4d35ae4368_F_T_WP_AB_2_P_0_AU_5A" in the spec's examples.
    campaign, _, rest = context["cid"].partition("_")
    assert len(campaign) == 24 and int(campaign, 16) >= 0
    assert rest == "F_T_WP_AB_1_P_0_AU_5A"
    assert all(isinstance(v, str) for v in context.values())


def test_only_active_experiences_are_returned() -> None:
    for status in ("Paused", "Scheduled"):
        assert evaluate(one_audience(None, status=status), ["x"], customer_id="a") == {}
    assert "x" in evaluate(one_audience(None), ["x"], customer_id="a")


def test_unknown_keys_are_absent_and_no_keys_means_all_active() -> None:
    sample = load_sample_file()
    assert evaluate(sample, ["nope"], customer_id="alice") == {}
    everything = evaluate(sample, None, customer_id="alice")
    assert set(everything) == {"hero-banner", "sidebar-promo", "product-upsell"}


def test_first_matching_audience_wins() -> None:
    sample = load_sample_file()
    gold = evaluate(sample, ["hero-banner"], customer_id="alice")["hero-banner"]
    other = evaluate(sample, ["hero-banner"], customer_id="zed")["hero-banner"]
    assert gold["experience_context"]["audience_name"] == "Gold members"
    assert other["experience_context"]["audience_name"] == "All Users"


def test_audience_without_rules_is_everyone_including_anonymous() -> None:
    assert matches(None, customer_id=None)
    assert matches([], customer_id="anyone")


@pytest.mark.parametrize(
    ("rule", "customer_id", "expected"),
    [
        ({"user": "tier", "equals": "gold"}, "alice", True),
        ({"user": "tier", "equals": "gold"}, "bob", False),
        ({"user": "tier", "equals": "gold"}, "stranger", False),
        ({"user": "tier", "not_equals": "gold"}, "bob", True),
        ({"user": "tier", "not_equals": "gold"}, "stranger", False),
        ({"user": "tier", "in": ["gold", "platinum"]}, "alice", True),
        ({"user": "tier", "not_in": ["gold"]}, "bob", True),
        ({"user": "orders", "gt": 10}, "alice", True),
        ({"user": "orders", "gte": 2, "lt": 3}, "bob", True),  # "2" compares as a number
        ({"user": "orders", "lte": 1}, "bob", False),
        ({"user": "orders", "equals": 12}, "alice", True),
        ({"user": "tier", "exists": True}, "alice", True),
        ({"user": "tier", "exists": False}, "stranger", True),
        ({"user": "tags", "contains": "vip"}, "bob", True),
        ({"user": "u_em", "contains": "@example.com"}, "alice", True),
        ({"user": "u_em", "starts_with": "alice@"}, "alice", True),
        ({"identified": True}, "alice", True),
        ({"identified": True}, "visitor-123", False),
        ({"identified": False}, "visitor-123", True),
        ({"identified": False}, None, True),
    ],
)
def test_user_attribute_and_identity_rules(
    rule: dict[str, Any], customer_id: str | None, expected: bool
) -> None:
    assert matches([rule], customer_id=customer_id) is expected


def test_user_identifiers_resolve_to_a_declared_user() -> None:
    file = one_audience([{"user": "tier", "equals": "gold"}])
    by_email = evaluate(file, ["x"], user_identifiers={"u_em": "alice@example.com"})
    assert "x" in by_email
    unknown = evaluate(file, ["x"], user_identifiers={"u_em": "nobody@example.com"})
    assert unknown == {}
    # The resolved user buckets like the customer id itself: same variation either way.
    sample = load_sample_file()
    assert evaluate(sample, ["product-upsell"], customer_id="bob") == evaluate(
        sample, ["product-upsell"], user_identifiers={"u_em": "bob@example.com"}
    )


def test_utm_medium_in_session_attribute() -> None:
    rule = [{"session": "utm_medium", "equals": "email"}]
    assert matches(rule, utm_medium="email")
    assert not matches(rule, utm_medium="Email")  # case-sensitive, as MoEngage
    assert not matches(rule, utm_medium="cpc")
    assert not matches(rule)
    sample = load_sample_file()
    landing = evaluate(sample, ["email-landing-banner"], customer_id="z", attributes={})
    assert landing == {}
    landing = evaluate(
        sample, ["email-landing-banner"], customer_id="z", attributes={"utm_medium": "email"}
    )
    assert landing["email-landing-banner"]["payload"]["offer"]["value"].endswith("EMAIL15")


def test_day_of_week_rule() -> None:
    weekend = [{"day_of_week": ["Saturday", "Sunday"]}]
    assert matches(weekend, DAY_OF_THE_WEEK="Sunday")
    assert not matches(weekend, DAY_OF_THE_WEEK="Monday")
    assert not matches(weekend)
    assert matches([{"day_of_week": "Monday"}], DAY_OF_THE_WEEK="Monday")


def test_hour_rules() -> None:
    office = [{"hour": {"gte": 9, "lt": 17}}]
    assert matches(office, TIME_OF_THE_DAY="09")
    assert matches(office, TIME_OF_THE_DAY="16")
    assert not matches(office, TIME_OF_THE_DAY="17")
    assert not matches(office, TIME_OF_THE_DAY="08")
    assert not matches(office)
    assert matches([{"hour": [22, 23, 0]}], TIME_OF_THE_DAY="00")
    assert matches([{"hour": 7}], TIME_OF_THE_DAY="07")
    assert not matches([{"hour": {"in": [1, 2], "gt": 1}}], TIME_OF_THE_DAY="01")


@pytest.mark.parametrize(
    ("user_agent", "expected"),
    [
        (IPHONE, "mobile"),
        (ANDROID_PHONE, "mobile"),
        (ANDROID_TABLET, "tablet"),
        (IPAD, "tablet"),
        (DESKTOP, "desktop"),
        ("", None),
        (None, None),
    ],
)
def test_device_type_from_user_agent(user_agent: str | None, expected: str | None) -> None:
    assert device_type(user_agent) == expected


def test_device_rule() -> None:
    assert matches([{"device": "mobile"}], USER_AGENT=IPHONE)
    assert not matches([{"device": "mobile"}], USER_AGENT=DESKTOP)
    assert matches([{"device": ["tablet", "desktop"]}], USER_AGENT=IPAD)
    assert not matches([{"device": "desktop"}])
    sample = load_sample_file()
    promo = evaluate(sample, ["sidebar-promo"], customer_id="v1", attributes={"USER_AGENT": IPHONE})
    assert promo["sidebar-promo"]["experience_context"]["audience_name"] == "Mobile visitors"


def test_combinators() -> None:
    rule = {
        "any": [
            {"session": "utm_medium", "equals": "email"},
            {"all": [{"device": "mobile"}, {"not": {"day_of_week": "Sunday"}}]},
        ]
    }
    assert matches(rule, utm_medium="email")
    assert matches(rule, USER_AGENT=IPHONE, DAY_OF_THE_WEEK="Monday")
    assert not matches(rule, USER_AGENT=IPHONE, DAY_OF_THE_WEEK="Sunday")
    assert not matches(rule, USER_AGENT=DESKTOP, DAY_OF_THE_WEEK="Monday")


def test_session_attribute_numbers_and_booleans_compare_loosely() -> None:
    assert matches([{"session": "page", "equals": 3}], page="3")
    assert matches([{"session": "page", "gt": 2.5}], page="3")
    assert not matches([{"session": "page", "gt": 2.5}], page="three")
    assert matches([{"session": "beta", "equals": True}], beta="true")
    assert not matches([{"session": "beta", "equals": True}], beta="1")


def test_payload_comes_back_in_the_wire_shape() -> None:
    sample = load_sample_file()
    result = evaluate(sample, ["product-upsell"], customer_id="bob")["product-upsell"]
    payload = result["payload"]
    assert payload["price"]["data_type"] == "float"
    assert isinstance(payload["price"]["value"], str)
    assert payload["show_badge"]["value"] in ("true", "false")
