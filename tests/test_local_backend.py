"""LocalBackend: the PersonalizeBackend protocol in process, events, de-duplication, JSONL."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from personalize_middleware import (
    BadRequestError,
    ConfigurationError,
    EventElement,
    Experience,
    PersonalizeBackend,
)
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN
from personalize_middleware.local import LocalBackend, sample_file_path

pytestmark = pytest.mark.anyio


def element(
    context: Mapping[str, Any],
    *,
    action: str = ACTION_SHOWN,
    customer_id: str = "alice",
    b_id: str | None = None,
    event_uuid: str | None = None,
    **overrides: Any,
) -> EventElement:
    attributes = dict(context)
    if b_id is not None:
        attributes["b_id"] = b_id
    act: dict[str, Any] = {
        "action": action,
        "moe_event_uuid": event_uuid or str(uuid.uuid4()),
        "event_time": 1725258666,
        "platform": "web",
        "attributes": attributes,
    }
    act.update(overrides)
    return {"customer_id": customer_id, "actions": [act]}


async def hero_context(backend: LocalBackend, customer_id: str = "alice") -> dict[str, Any]:
    found = await backend.fetch_experiences(["hero-banner"], customer_id=customer_id)
    return dict(found["hero-banner"].experience_context)


async def test_implements_the_backend_protocol() -> None:
    async with LocalBackend.default() as backend:
        assert isinstance(backend, PersonalizeBackend)
        assert "sample_experiences.json" in repr(backend)


async def test_fetch_returns_parsed_experiences_only_for_matches() -> None:
    backend = LocalBackend.default()
    found = await backend.fetch_experiences(
        ["hero-banner", "product-upsell", "cart-upsell", "email-landing-banner", "nope"],
        customer_id="alice",
    )
    assert set(found) == {"hero-banner", "product-upsell"}
    upsell = found["product-upsell"]
    assert isinstance(upsell, Experience)
    assert isinstance(upsell.get("price"), float)
    assert isinstance(upsell.get("discount_percent"), int)
    assert isinstance(upsell.get("show_badge"), bool)
    assert found["hero-banner"].get("theme") == "gold"


async def test_fetch_passes_in_session_attributes_and_user_identifiers() -> None:
    backend = LocalBackend.default()
    found = await backend.fetch_experiences(
        ["email-landing-banner"],
        user_identifiers={"u_em": "carol@example.com"},
        attributes={"utm_medium": "email", "DAY_OF_THE_WEEK": "Monday", "TIME_OF_THE_DAY": "08"},
    )
    assert "email-landing-banner" in found


async def test_more_than_25_keys_are_fine_in_process(tmp_path: Path) -> None:
    experiences = [
        {
            "key": f"k{i}",
            "name": f"K{i}",
            "status": "Active",
            "audiences": [{"name": "All", "variations": [{"payload": {}}]}],
        }
        for i in range(30)
    ]
    backend = LocalBackend({"experiences": experiences})
    found = await backend.fetch_experiences([f"k{i}" for i in range(30)], customer_id="u")
    assert len(found) == 30


async def test_argument_mistakes_raise_like_the_http_client() -> None:
    backend = LocalBackend.default()
    with pytest.raises(ConfigurationError, match="not a single string"):
        await backend.fetch_experiences("hero-banner", customer_id="a")
    with pytest.raises(ConfigurationError, match="needs customer_id or user_identifiers"):
        await backend.fetch_experiences(["hero-banner"])
    with pytest.raises(ConfigurationError, match="reserved"):
        await backend.fetch_experiences(
            ["hero-banner"], customer_id="a", attributes={"experience_key": "x"}
        )
    with pytest.raises(ConfigurationError, match="case-sensitive"):
        await backend.fetch_metadata(["active"])
    assert await backend.fetch_experiences([], customer_id="a") == {}


async def test_invalid_in_session_values_are_a_bad_request_like_the_api() -> None:
    backend = LocalBackend.default()
    with pytest.raises(BadRequestError) as info:
        await backend.fetch_experiences(
            ["hero-banner"], customer_id="a", attributes={"DAY_OF_THE_WEEK": "funday"}
        )
    assert info.value.title == "Invalid Field Value"
    assert info.value.description is not None and "DAY_OF_THE_WEEK" in info.value.description
    with pytest.raises(BadRequestError, match="TIME_OF_THE_DAY"):
        await backend.fetch_experiences(
            ["hero-banner"], customer_id="a", attributes={"TIME_OF_THE_DAY": 9}
        )


async def test_metadata_filters_by_status() -> None:
    backend = LocalBackend.default()
    everything = await backend.fetch_metadata()
    assert {m.status for m in everything} == {"Active", "Paused", "Scheduled"}
    paused = await backend.fetch_metadata(["Paused"])
    assert [(m.key, m.name) for m in paused] == [("cart-upsell", "Cart upsell widget")]
    both = await backend.fetch_metadata("Paused,Scheduled")
    assert {m.key for m in both} == {"cart-upsell", "christmas-sale-strip"}
    assert backend.metadata(["Unknown"]) == []  # the API's answer to an unknown status


async def test_events_are_recorded_and_deduplicated_on_uuid() -> None:
    backend = LocalBackend.default()
    context = await hero_context(backend)
    shown = element(context)
    await backend.track_events([shown])
    await backend.track_events([shown])  # a retry: same uuid, not counted twice
    click = element(context, action=ACTION_CLICKED, b_id="Add to Cart")
    await backend.track_events([click])
    events = backend.events
    assert [e.action for e in events] == [ACTION_SHOWN, ACTION_CLICKED]
    assert events[0].experience_key == "hero-banner"
    assert events[1].b_id == "Add to Cart"
    report = backend.report()
    assert report.events_recorded == 2
    assert report.duplicates_ignored == 1


async def test_b_id_beside_attributes_is_accepted_too() -> None:
    backend = LocalBackend.default()
    context = await hero_context(backend)
    await backend.track_events([element(context, action=ACTION_CLICKED)])
    # The spec's schema variant: b_id beside attributes.
    beside = element(context, action=ACTION_CLICKED)
    beside["actions"][0]["b_id"] = "Wishlist"
    await backend.track_events([beside])
    assert [e.b_id for e in backend.events] == [None, "Wishlist"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"action": "MOE_PERSONALIZATION_MESSAGE_HOVERED"}, "actions[0].action"),
        ({"action": "moe_personalization_message_shown"}, "actions[0].action"),
        ({"moe_event_uuid": "not-a-uuid"}, "actions[0].moe_event_uuid"),
        ({"moe_event_uuid": str(uuid.uuid1())}, "actions[0].moe_event_uuid"),
        ({"event_time": 1725258666000}, "actions[0].event_time"),
        ({"event_time": "1725258666"}, "actions[0].event_time"),
        ({"platform": "desktop"}, "actions[0].platform"),
        ({"attributes": {"cid": "x"}}, "actions[0].attributes.experience"),
        ({"attributes": "x"}, "actions[0].attributes"),
    ],
)
async def test_bad_actions_are_refused_like_the_api(overrides: dict[str, Any], field: str) -> None:
    backend = LocalBackend.default()
    context = await hero_context(backend)
    bad = element(context, **overrides)
    with pytest.raises(BadRequestError) as info:
        await backend.track_events([element(context), bad])
    assert info.value.description is not None
    assert info.value.description.startswith(f"elements[1].{field} - ")
    assert info.value.status_code == 400
    assert backend.events == ()  # a refused batch records nothing


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"customer_id": ""}, "customer_id"),
        ({"actions": []}, "actions"),
        ({"user_timezone_offset": 60000}, "user_timezone_offset"),
        ({"user_timezone_offset": 1.5}, "user_timezone_offset"),
        ({"user_attributes": []}, "user_attributes"),
    ],
)
async def test_bad_elements_are_refused(change: dict[str, Any], field: str) -> None:
    backend = LocalBackend.default()
    bad = {**element(await hero_context(backend)), **change}
    with pytest.raises(BadRequestError, match=rf"elements\[0\]\.{field} - "):
        await backend.track_events([bad])


async def test_platform_is_case_insensitive_and_recorded_lower_case() -> None:
    backend = LocalBackend.default()
    await backend.track_events([element(await hero_context(backend), platform="Web")])
    assert backend.events[0].platform == "web"


async def test_more_than_100_elements_is_a_bad_request() -> None:
    backend = LocalBackend.default()
    context = await hero_context(backend)
    with pytest.raises(BadRequestError, match="at most 100"):
        await backend.track_events([element(context) for _ in range(101)])
    await backend.track_events([element(context) for _ in range(100)])
    assert len(backend.events) == 100


async def test_events_log_appends_json_lines_and_is_read_back(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    backend = LocalBackend(sample_file_path(), events_log=log)
    context = await hero_context(backend)
    first = element(context)
    await backend.track_events([first, element(context, action=ACTION_CLICKED, b_id="Go")])
    await backend.track_events([first])  # duplicate: not logged again
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [line["action"] for line in lines] == [ACTION_SHOWN, ACTION_CLICKED]
    assert lines[1]["b_id"] == "Go"
    assert lines[0]["attributes"]["cid"] == context["cid"]
    assert lines[0]["experience_key"] == "hero-banner"

    # A restart reads the log back: the report and de-duplication survive it.
    restarted = LocalBackend(sample_file_path(), events_log=log)
    assert len(restarted.events) == 2
    hero = next(e for e in restarted.report().experiences if e.key == "hero-banner")
    assert (hero.total.impressions, hero.total.clicks) == (1, 1)
    await restarted.track_events([first])
    assert len(log.read_text(encoding="utf-8").splitlines()) == 2


async def test_a_torn_log_line_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "events.jsonl"
    backend = LocalBackend.default(events_log=log)
    await backend.track_events([element(await hero_context(backend))])
    with log.open("a", encoding="utf-8") as f:
        f.write('{"customer_id": "x", "acti')
    with caplog.at_level(logging.WARNING, logger="personalize_middleware"):
        restarted = LocalBackend.default(events_log=log)
    assert len(restarted.events) == 1
    assert "skipped 1 unreadable line" in caplog.text


async def test_events_log_in_a_missing_directory_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        LocalBackend.default(events_log=tmp_path / "nope" / "events.jsonl")


async def test_events_memory_is_bounded_but_the_report_counts_everything() -> None:
    backend = LocalBackend(sample_file_path(), max_events=3)
    context = await hero_context(backend)
    await backend.track_events([element(context) for _ in range(5)])
    assert len(backend.events) == 3
    hero = next(e for e in backend.report().experiences if e.key == "hero-banner")
    assert hero.total.impressions == 5
    with pytest.raises(ConfigurationError, match="max_events"):
        LocalBackend(sample_file_path(), max_events=0)


async def test_report_rows_are_bounded_after_a_restart_too(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    backend = LocalBackend(sample_file_path(), events_log=log, max_report_rows=2)
    context = await hero_context(backend)
    clicks = [element(context, action=ACTION_CLICKED, b_id=f"b{i}") for i in range(5)]
    await backend.track_events(clicks)
    restarted = LocalBackend(sample_file_path(), events_log=log, max_report_rows=2)
    for report in (backend.report(), restarted.report()):
        hero = next(e for e in report.experiences if e.key == "hero-banner")
        assert [b.label for b in hero.b_ids] == ["b0", "b1"]
        assert hero.other_b_ids is not None and hero.other_b_ids.clicks == 3
    with pytest.raises(ConfigurationError, match="max_report_rows"):
        LocalBackend(sample_file_path(), max_report_rows=0)
