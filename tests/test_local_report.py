"""The local report: aggregation per experience / variation / b_id, the HTML page, the app."""

from __future__ import annotations

import ast
import html
import importlib.resources
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

import personalize_middleware.local
from personalize_middleware import ConfigurationError, EventAction, EventElement
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN
from personalize_middleware.local import (
    DEFAULT_MAX_REPORT_ROWS,
    OTHER_B_IDS_LABEL,
    OTHER_EXPERIENCES_KEY,
    OTHER_VARIATIONS_LABEL,
    ExperienceReport,
    LocalBackend,
    Report,
    ReportCounter,
    ReportRow,
    ReportSource,
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


def action(context: dict[str, Any], kind: str, b_id: str | None = None) -> EventAction:
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
    # Jinja's autoescape (markupsafe) writes a double quote as &#34; (html.escape: &quot;).
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;"
    assert page.count(escaped) == 2  # the experience's name and the clicked b_id
    assert EVIL not in page and html.unescape(page).count(EVIL) == 2
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


# -- the report's sources: a counter anyone can feed ------------------------------------


def unknown_context(name: str = "Made elsewhere", variation: str = "4") -> dict[str, Any]:
    return {
        "cid": "ffffffffffffffffffffffff_F_T_WP_AB_1_P_0_AU_9",
        "experience": name,
        "moe_locale_id": "0",
        "moe_variation_id": variation,
        "audience_name": "X",
        "audience_id": "9",
        "type": "Web Personalization",
    }


def test_a_counter_without_a_file_groups_by_the_experience_name() -> None:
    counter = ReportCounter()
    counter.record(ACTION_SHOWN, unknown_context())
    counter.record(ACTION_CLICKED, {**unknown_context(), "b_id": "Buy"})
    counter.record(ACTION_CLICKED, unknown_context(), b_id="Later", experience_key="promo")
    report = counter.report()
    assert [e.key for e in report.experiences] == ["Made elsewhere", "promo"]
    made = report.experiences[0]
    assert (made.total.impressions, made.total.clicks) == (1, 1)
    assert [(b.label, b.clicks) for b in made.b_ids] == [("Buy", 1)]
    assert report.experiences[1].b_ids[0].label == "Later"
    assert report.events_recorded == 3


async def test_record_elements_counts_what_any_backend_sent() -> None:
    """The elements a backend's ``track_events`` took, counted like the local backend
    counts them: the same report for the same events."""
    backend = two_variation_backend()
    user, context = await user_in(backend, "1")
    elements: list[EventElement] = [
        {
            "customer_id": user,
            "actions": [
                action(context, ACTION_SHOWN),
                action(context, ACTION_CLICKED, "Add to Cart"),
            ],
        }
    ]
    # A b_id beside the attributes (which the local backend accepts) is read too.
    beside = action(context, ACTION_CLICKED)
    beside["b_id"] = "Wishlist"  # type: ignore[typeddict-unknown-key]
    elements.append({"customer_id": user, "actions": [beside]})
    counter = ReportCounter(backend.experiences)
    assert counter.record_elements(elements) == 3
    await backend.track_events(elements)
    assert counter.report() == backend.report()
    hero = next(e for e in counter.report().experiences if e.key == "hero")
    assert {b.label for b in hero.b_ids} == {"Add to Cart", "Wishlist"}


def test_the_local_backend_owns_a_counter_and_uses_its_row_limit() -> None:
    backend = LocalBackend(two_variation_backend().experiences, max_report_rows=3)
    assert isinstance(backend.report_counter, ReportCounter)
    assert backend.report_counter.max_rows == 3
    assert ReportCounter().max_rows == DEFAULT_MAX_REPORT_ROWS == 50
    with pytest.raises(ConfigurationError, match="max_rows"):
        ReportCounter(max_rows=0)


async def test_report_app_serves_any_report_source() -> None:
    counter = ReportCounter()
    counter.record(ACTION_SHOWN, unknown_context(name="Counted elsewhere"))

    class Fixed:
        def report(self) -> Report:
            return Report(experiences=(), events_recorded=7, duplicates_ignored=0)

    assert isinstance(counter, ReportSource) and isinstance(Fixed(), ReportSource)
    for source, expected in ((counter, "Counted elsewhere"), (Fixed(), "7 events recorded")):
        transport = httpx.ASGITransport(app=local_report_app(source))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert expected in (await client.get("/")).text
    with pytest.raises(ConfigurationError, match=r"report\(\) method"):
        local_report_app(object())  # type: ignore[arg-type]


async def test_head_answers_the_pages_headers_without_its_body() -> None:
    transport = httpx.ASGITransport(app=local_report_app(two_variation_backend()))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        page = await client.get("/report")
        head = await client.head("/report")
    assert head.content == b""
    assert head.headers["content-length"] == str(len(page.content))
    assert head.headers["content-type"] == page.headers["content-type"]
    assert head.headers["content-security-policy"] == page.headers["content-security-policy"]


# -- memory bound ------------------------------------------------------------------------

FLOOD = 10_000


async def test_regression_a_flood_of_distinct_b_ids_keeps_the_report_bounded() -> None:
    """Each new b_id used to add a row forever: 10,000 distinct ones, 10,000 rows."""
    backend = two_variation_backend()
    user, context = await user_in(backend, "1")
    for start in range(0, FLOOD, 100):  # the API's 100 elements a call
        await backend.track_events(
            [
                {"customer_id": user, "actions": [action(context, ACTION_CLICKED, f"b{i}")]}
                for i in range(start, start + 100)
            ]
        )
    await backend.track_events([{"customer_id": user, "actions": [action(context, ACTION_SHOWN)]}])
    hero = next(e for e in backend.report().experiences if e.key == "hero")
    assert len(hero.b_ids) == DEFAULT_MAX_REPORT_ROWS
    assert hero.other_b_ids is not None
    assert hero.other_b_ids.label == OTHER_B_IDS_LABEL
    assert hero.other_b_ids.clicks == FLOOD - DEFAULT_MAX_REPORT_ROWS
    assert sum(b.clicks for b in hero.b_ids) + hero.other_b_ids.clicks == FLOOD
    assert hero.total.clicks == FLOOD and hero.other_b_ids.impressions == 1
    # The first b_ids seen keep their rows: their counts are exact.
    assert {b.label for b in hero.b_ids} == {f"b{i}" for i in range(DEFAULT_MAX_REPORT_ROWS)}
    data = backend.report().to_json()["experiences"][0]
    assert len(data["b_ids"]) == DEFAULT_MAX_REPORT_ROWS
    assert data["other_b_ids"]["clicks"] == FLOOD - DEFAULT_MAX_REPORT_ROWS
    page = render_report(backend.report())
    assert page.count("<tr") < 3 * DEFAULT_MAX_REPORT_ROWS
    assert f'<tr class="other"><td>{OTHER_B_IDS_LABEL}</td>' in page


def test_regression_a_flood_of_distinct_variations_keeps_the_report_bounded() -> None:
    backend = two_variation_backend()
    counter = ReportCounter(backend.experiences, max_rows=10)
    hero_cid = next(iter(backend.experiences.experiences.values()))
    cid = hero_cid.cid(hero_cid.audiences[0])
    for i in range(FLOOD):
        counter.record(ACTION_SHOWN, {**unknown_context(variation=f"v{i}"), "cid": cid})
    for known in ("1", "2"):  # the file's own variations still get their rows
        counter.record(
            ACTION_SHOWN, {**unknown_context(variation=known), "audience_id": "1A", "cid": cid}
        )
    hero = next(e for e in counter.report().experiences if e.key == "hero")
    assert len(hero.variations) == 12
    assert "Blue (1) · All" in {v.label for v in hero.variations}
    assert hero.other_variations is not None
    assert hero.other_variations.label == OTHER_VARIATIONS_LABEL
    assert hero.other_variations.impressions == FLOOD - 10
    assert sum(v.impressions for v in hero.variations) + hero.other_variations.impressions == (
        hero.total.impressions
    )
    assert hero.total.impressions == FLOOD + 2


def test_regression_a_flood_of_unknown_experiences_keeps_the_report_bounded() -> None:
    counter = ReportCounter(two_variation_backend().experiences, max_rows=5)
    for i in range(FLOOD):
        counter.record(ACTION_SHOWN, unknown_context(name=f"spam {i}"), b_id=f"b{i}")
        counter.record(ACTION_CLICKED, unknown_context(name=f"spam {i}", variation=f"{i}"))
    report = counter.report()
    assert [e.key for e in report.experiences][:2] == ["hero", "quiet"]
    assert len(report.experiences) == 2 + 5
    other = report.other_experiences
    assert isinstance(other, ExperienceReport)
    assert other.key == OTHER_EXPERIENCES_KEY
    assert (other.total.impressions, other.total.clicks) == (FLOOD - 5, FLOOD - 5)
    assert len(other.variations) <= 5 and other.other_variations is not None
    listed = sum(e.total.impressions for e in report.experiences)
    assert listed + other.total.impressions == FLOOD == report.events_recorded // 2
    assert report.to_json()["other_experiences"]["total"]["impressions"] == FLOOD - 5
    page = render_report(report)
    assert "Other experiences" in page and OTHER_EXPERIENCES_KEY in page


def test_other_rows_are_absent_until_something_overflows() -> None:
    counter = ReportCounter()
    counter.record(ACTION_CLICKED, unknown_context(), b_id="Buy")
    report = counter.report()
    assert report.other_experiences is None
    assert report.experiences[0].other_b_ids is None
    assert report.experiences[0].other_variations is None
    data = report.to_json()
    assert data["other_experiences"] is None
    assert data["experiences"][0]["other_b_ids"] is None
    assert 'class="other"' not in render_report(report)


# -- packaging and structure -------------------------------------------------------------


def test_the_template_ships_inside_the_package() -> None:
    templates = importlib.resources.files("personalize_middleware.local") / "templates"
    assert "<!doctype html>" in (templates / "report.html").read_text(encoding="utf-8")


def test_no_import_cycle_inside_local_counting_type_checking_imports() -> None:
    package = Path(personalize_middleware.local.__file__).parent
    edges: dict[str, set[str]] = {}
    for source in package.glob("*.py"):
        targets = edges.setdefault(source.stem, set())
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    targets.add(node.module.split(".")[0])
                else:
                    targets.update(alias.name for alias in node.names)
    assert edges["_report_app"] == {"_report"}  # the page knows the report, not a backend

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        for target in edges.get(module, ()):
            visit(target, (*path, module))

    for module in edges:
        visit(module, ())
