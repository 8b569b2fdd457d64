"""The local report: aggregation per experience / variation / b_id, the HTML page, the app."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN
from personalize_middleware.local import (
    LocalBackend,
    Report,
    ReportRow,
    local_report_app,
    render_report,
)

pytestmark = pytest.mark.anyio

EVIL = '<script>alert("x")</script>&'


def two_variation_backend(name: str = "Hero") -> LocalBackend:
    return LocalBackend(
        {
            "experiences": [
                {
                    "key": "hero",
                    "name": name,
                    "status": "Active",
                    "audiences": [
                        {
                            "name": "All",
                            "id": "1A",
                            "variations": [
                                {"id": "1", "name": "Blue", "weight": 50, "payload": {}},
                                {"id": "2", "name": "Green", "weight": 50, "payload": {}},
                            ],
                        }
                    ],
                },
                {
                    "key": "quiet",
                    "name": "Quiet one",
                    "status": "Active",
                    "audiences": [{"name": "All", "variations": [{"payload": {}}]}],
                },
            ]
        }
    )


def action(context: dict[str, Any], kind: str, b_id: str | None = None) -> dict[str, Any]:
    attributes = dict(context)
    if b_id is not None:
        attributes["b_id"] = b_id
    return {
        "action": kind,
        "moe_event_uuid": str(uuid.uuid4()),
        "event_time": 1725258666,
        "platform": "web",
        "attributes": attributes,
    }


async def user_in(backend: LocalBackend, variation: str) -> tuple[str, dict[str, Any]]:
    for i in range(1000):
        found = await backend.fetch_experiences(["hero"], customer_id=f"u{i}")
        context = dict(found["hero"].experience_context)
        if context["moe_variation_id"] == variation:
            return f"u{i}", context
    raise AssertionError("no user found")


async def test_report_counts_per_experience_variation_and_b_id() -> None:
    backend = two_variation_backend()
    blue_user, blue = await user_in(backend, "1")
    green_user, green = await user_in(backend, "2")
    await backend.track_events(
        [
            {
                "customer_id": blue_user,
                "actions": [
                    action(blue, ACTION_SHOWN),
                    action(blue, ACTION_SHOWN),
                    action(blue, ACTION_SHOWN),
                    action(blue, ACTION_CLICKED, "Add to Cart"),
                    action(blue, ACTION_CLICKED, "Wishlist"),
                ],
            },
            {
                "customer_id": green_user,
                "actions": [
                    action(green, ACTION_SHOWN),
                    action(green, ACTION_CLICKED, "Add to Cart"),
                ],
            },
        ]
    )
    report = backend.report()
    assert isinstance(report, Report)
    by_key = {e.key: e for e in report.experiences}
    assert set(by_key) == {"hero", "quiet"}  # experiences without events are listed too
    hero = by_key["hero"]
    assert hero.name == "Hero"
    assert (hero.total.impressions, hero.total.clicks) == (4, 3)
    assert hero.total.ctr == pytest.approx(0.75)
    assert [(v.label, v.impressions, v.clicks) for v in hero.variations] == [
        ("Blue (1) · All", 3, 2),
        ("Green (2) · All", 1, 1),
    ]
    assert [(b.label, b.clicks, b.impressions) for b in hero.b_ids] == [
        ("Add to Cart", 2, 4),
        ("Wishlist", 1, 4),
    ]
    assert hero.b_ids[0].ctr == pytest.approx(0.5)
    quiet = by_key["quiet"]
    assert quiet.total.ctr is None and quiet.variations == ()


async def test_events_for_an_unknown_campaign_are_grouped_by_experience_name() -> None:
    backend = two_variation_backend()
    context = {
        "cid": "ffffffffffffffffffffffff_F_T_WP_AB_1_P_0_AU_9",
        "experience": "Made elsewhere",
        "moe_locale_id": "0",
        "moe_variation_id": "4",
        "audience_name": "X",
        "audience_id": "9",
        "type": "Web Personalization",
    }
    await backend.track_events([{"customer_id": "u", "actions": [action(context, ACTION_SHOWN)]}])
    other = [e for e in backend.report().experiences if e.name == "Made elsewhere"]
    assert len(other) == 1
    assert other[0].total.impressions == 1
    assert other[0].variations[0].label == "variation 4 (4) · audience 9"
    assert backend.events[0].experience_key is None


def test_report_row_ctr() -> None:
    assert ReportRow("x", 0, 0).ctr is None
    assert ReportRow("x", 4, 1).ctr == 0.25


async def test_html_escapes_everything_and_has_no_script() -> None:
    backend = two_variation_backend(name=EVIL)
    _, context = await user_in(backend, "1")
    await backend.track_events(
        [
            {
                "customer_id": "u",
                "actions": [action(context, ACTION_SHOWN), action(context, ACTION_CLICKED, EVIL)],
            }
        ]
    )
    page = render_report(backend.report(), title="Report <b>")
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    assert "Report &lt;b&gt;" in page
    assert "http://" not in page and "https://" not in page  # no third-party asset
    # A bar at 100% for the clicked b_id's 1 click over 1 impression.
    assert 'style="width:100.0%"' in page
    assert "100.0%" in page  # CTR column


def test_empty_report_renders() -> None:
    page = render_report(Report(experiences=(), events_recorded=0, duplicates_ignored=0))
    assert "No experiences and no events yet." in page


async def test_report_app_serves_the_page_and_json_under_any_prefix() -> None:
    backend = two_variation_backend()
    app = local_report_app(backend)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        page = await client.get("/_personalize/report")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-store"
        assert "script-src" not in page.headers["content-security-policy"]
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert "Quiet one" in page.text
        data = await client.get("/_personalize/report/report.json")
        assert data.status_code == 200
        assert {e["key"] for e in data.json()["experiences"]} == {"hero", "quiet"}
        head = await client.head("/")
        assert head.status_code == 200 and head.content == b""
        post = await client.post("/")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"
