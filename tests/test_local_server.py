"""The MoEngage-compatible local server, over real HTTP on 127.0.0.1, its answers
validated against the published spec."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from starlette.types import Message, Scope

from personalize_middleware import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    PersonalizeClient,
    PersonalizeSettings,
)
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN
from personalize_middleware.local import LocalBackend, create_local_server
from personalize_middleware.local._server import MAX_BODY_BYTES, MAX_HEAD_BYTES
from tests.support.http_server import run_asgi_server
from tests.support.spec import validate_request_parts, validate_response

WORKSPACE = "TESTWORKSPACE1"
SECRET = "s3cret-for-tests"


def auth_headers(workspace: str = WORKSPACE, secret: str = SECRET) -> dict[str, str]:
    token = base64.b64encode(f"{workspace}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}", "MOE-APPKEY": workspace}


def many_keys_backend(count: int = 30) -> LocalBackend:
    return LocalBackend(
        {
            "experiences": [
                {
                    "key": f"k{i:02d}",
                    "name": f"K{i}",
                    "status": "Active",
                    "audiences": [
                        {
                            "name": "All",
                            "variations": [
                                {"payload": {"N": {"value": str(i), "data_type": "number"}}}
                            ],
                        }
                    ],
                }
                for i in range(count)
            ]
        }
    )


class _Swappable:
    """One uvicorn for the module (start/stop costs ~0.2 s); each test gets a fresh app."""

    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return  # the local server needs no lifespan
        await self.app(scope, receive, send)


class Server:
    def __init__(self, base: str, backend: LocalBackend, holder: _Swappable) -> None:
        self.base = base
        self.api = base + "/v1"
        self.backend = backend
        self.http = httpx.Client(timeout=5)
        self._holder = holder

    def swap(self, app: Any) -> None:
        self._holder.app = app

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        response = self.http.request(
            method,
            self.api + path,
            json=json,
            content=content,
            headers=auth_headers() if headers is None else headers,
            params=params,
        )
        # Every answer of the stand-in must be one the real API could give.
        validate_response(method, path, response.status_code, response.content)
        return response


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[str, _Swappable]]:
    holder = _Swappable()
    with run_asgi_server(holder, lifespan="off") as base:
        yield base, holder


@pytest.fixture
def server(running: tuple[str, _Swappable]) -> Iterator[Server]:
    base, holder = running
    backend = LocalBackend.default()
    holder.app = create_local_server(backend, workspace_id=WORKSPACE, api_secret=SECRET)
    s = Server(base, backend, holder)
    try:
        yield s
    finally:
        s.http.close()


def fetch_body(**extra: Any) -> dict[str, Any]:
    return {
        "identifiers": {"customer_id": "alice"},
        "experience_key": ["hero-banner", "product-upsell"],
        **extra,
    }


def test_fetch_answers_the_wire_shape(server: Server) -> None:
    body = fetch_body(DAY_OF_THE_WEEK="Monday", TIME_OF_THE_DAY="14", USER_AGENT="Mozilla/5.0")
    validate_request_parts(
        "POST",
        server.api + "/experiences/fetch",
        {**auth_headers(), "Content-Type": "application/json"},
        httpx.Request("POST", "http://x", json=body).content,
    )
    response = server.call("POST", "/experiences/fetch", json=body)
    assert response.status_code == 200
    experiences = response.json()["experiences"]
    assert set(experiences) == {"hero-banner", "product-upsell"}
    assert experiences["hero-banner"]["experience_context"]["audience_name"] == "Gold members"
    assert experiences["product-upsell"]["payload"]["badges"]["data_type"] == "json"


def test_fetch_no_match_is_an_empty_object(server: Server) -> None:
    response = server.call(
        "POST",
        "/experiences/fetch",
        json={"identifiers": {"customer_id": "x"}, "experience_key": ["cart-upsell", "nope"]},
    )
    assert response.status_code == 200
    assert response.json() == {"experiences": {}}


def test_fetch_in_session_utm_medium(server: Server) -> None:
    body = {
        "identifiers": {"customer_id": "user_8821"},
        "experience_key": ["email-landing-banner"],
        "utm_medium": "email",
    }
    response = server.call("POST", "/experiences/fetch", json=body)
    assert list(response.json()["experiences"]) == ["email-landing-banner"]


def test_fetch_with_more_than_25_keys_answers_only_the_first_25(server: Server) -> None:
    backend = many_keys_backend(30)
    server.backend = backend
    server.swap(create_local_server(backend, workspace_id=WORKSPACE, api_secret=SECRET))
    keys = [f"k{i:02d}" for i in range(30)]
    response = server.call(
        "POST",
        "/experiences/fetch",
        json={"identifiers": {"customer_id": "u"}, "experience_key": keys},
    )
    assert response.status_code == 200
    assert sorted(response.json()["experiences"]) == keys[:25]


def test_fetch_without_keys_returns_all_active(server: Server) -> None:
    response = server.call("POST", "/experiences/fetch", json={"identifiers": {"customer_id": "q"}})
    assert set(response.json()["experiences"]) == {"hero-banner", "sidebar-promo", "product-upsell"}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"identifiers": {"customer_id": "a"}, "DAY_OF_THE_WEEK": "funday"}, "DAY_OF_THE_WEEK"),
        ({"identifiers": {"customer_id": "a"}, "TIME_OF_THE_DAY": "24"}, "TIME_OF_THE_DAY"),
        ({"identifiers": {"customer_id": 5}}, "identifiers.customer_id"),
        ({"identifiers": "alice"}, "identifiers"),
        ({"experience_key": "hero-banner"}, "experience_key"),
        ({"experience_key": [1]}, "experience_key"),
        ([1, 2], "body"),
    ],
)
def test_fetch_bad_fields_are_400_invalid_field_value(
    server: Server, body: Any, needle: str
) -> None:
    response = server.call("POST", "/experiences/fetch", json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["title"] == "Invalid Field Value"
    assert error["description"].startswith(needle + " - ")
    assert len(error["code"]) == 8


@pytest.mark.parametrize("path", ["/experiences/fetch", "/experiences/events"])
@pytest.mark.parametrize("content", [b'{"identifiers":', b"", b"\xff\xfe", b"nope"])
def test_malformed_json_is_400(server: Server, path: str, content: bytes) -> None:
    response = server.call(
        "POST",
        path,
        content=content,
        headers={**auth_headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["title"] == "Malformed JSON"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/experiences/fetch"),
        ("GET", "/experiences/metadata"),
        ("POST", "/experiences/events"),
    ],
)
def test_auth_failures(server: Server, method: str, path: str) -> None:
    body: dict[str, Any] = {"elements": []} if path.endswith("events") else {}
    wrong_secret = server.call(method, path, json=body, headers=auth_headers(secret="old"))
    assert wrong_secret.status_code == 401
    assert wrong_secret.json() == {
        "title": "Authentication required",
        "description": "Invalid API_KEY used in Authentication Header",
    }
    no_auth = server.call(method, path, json=body, headers={"MOE-APPKEY": WORKSPACE})
    assert no_auth.status_code == 401
    garbled = server.call(
        method, path, json=body, headers={"MOE-APPKEY": WORKSPACE, "Authorization": "Basic %%%"}
    )
    assert garbled.status_code == 401
    unknown_app = server.call(method, path, json=body, headers=auth_headers(workspace="OTHER"))
    assert unknown_app.status_code == 400
    assert unknown_app.json()["title"] == "Request Error"
    assert "MOE-APPKEY" in unknown_app.json()["description"]
    missing_app = server.call(
        method, path, json=body, headers={"Authorization": auth_headers()["Authorization"]}
    )
    assert missing_app.status_code == 400
    # A right appkey with another workspace's credentials is still a 401.
    mixed = {**auth_headers(workspace="OTHER"), "MOE-APPKEY": WORKSPACE}
    assert server.call(method, path, json=body, headers=mixed).status_code == 401


def test_metadata_with_and_without_status(server: Server) -> None:
    everything = server.call("GET", "/experiences/metadata").json()["metadata"]
    assert everything["count"] == 6 == len(everything["experiences"])
    active = server.call("GET", "/experiences/metadata", params={"status": "Active"}).json()
    assert {e["status"] for e in active["metadata"]["experiences"]} == {"Active"}
    two = server.call("GET", "/experiences/metadata", params={"status": "Paused,Scheduled"}).json()
    assert two["metadata"]["count"] == 2
    lower = server.call("GET", "/experiences/metadata", params={"status": "active"}).json()
    assert lower == {"metadata": {"count": 0, "experiences": []}}


def event_element(
    context: dict[str, Any], kind: str = ACTION_SHOWN, **extra: Any
) -> dict[str, Any]:
    return {
        "customer_id": "alice",
        "user_timezone_offset": 19800,
        "actions": [
            {
                "action": kind,
                "moe_event_uuid": str(uuid.uuid4()),
                "event_time": 1725258666,
                "platform": "web",
                "attributes": {**context, **extra},
            }
        ],
    }


def hero_context(server: Server) -> dict[str, Any]:
    response = server.call("POST", "/experiences/fetch", json=fetch_body())
    context: dict[str, Any] = response.json()["experiences"]["hero-banner"]["experience_context"]
    return context


def test_events_are_accepted_recorded_and_deduplicated(server: Server) -> None:
    context = hero_context(server)
    shown = event_element(context)
    click = event_element(context, ACTION_CLICKED, b_id="Add to Cart")
    response = server.call("POST", "/experiences/events", json={"elements": [shown, click]})
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == "success"
    assert answer["message"]
    assert len(answer["req_id"]) == 8
    again = server.call("POST", "/experiences/events", json={"elements": [shown]})
    assert again.status_code == 200
    assert [e.action for e in server.backend.events] == [ACTION_SHOWN, ACTION_CLICKED]
    assert server.backend.events[1].b_id == "Add to Cart"
    assert server.backend.report().duplicates_ignored == 1


def test_events_limit_is_100_elements(server: Server) -> None:
    context = hero_context(server)
    over = server.call(
        "POST", "/experiences/events", json={"elements": [event_element(context)] * 101}
    )
    assert over.status_code == 400
    assert "at most 100" in over.json()["description"]
    assert server.backend.events == ()
    ok = server.call(
        "POST",
        "/experiences/events",
        json={"elements": [event_element(context) for _ in range(100)]},
    )
    assert ok.status_code == 200
    assert len(server.backend.events) == 100


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda e: e["actions"][0].update(action="SHOWN"), "elements[0].actions[0].action"),
        (lambda e: e["actions"][0].update(event_time=1725258666000), "event_time"),
        (lambda e: e["actions"][0].update(moe_event_uuid="1234"), "moe_event_uuid"),
        (lambda e: e["actions"][0].update(platform="smartwatch"), "platform"),
        (lambda e: e["actions"][0]["attributes"].pop("audience_id"), "attributes.audience_id"),
        (lambda e: e.update(user_timezone_offset=-54001), "user_timezone_offset"),
        (lambda e: e.pop("customer_id"), "elements[0].customer_id"),
    ],
)
def test_bad_event_fields_are_400(server: Server, mutate: Any, needle: str) -> None:
    element = event_element(hero_context(server))
    mutate(element)
    response = server.call("POST", "/experiences/events", json={"elements": [element]})
    assert response.status_code == 400
    assert needle in response.json()["description"]
    assert response.json()["title"] == "Invalid Field Value"


def test_empty_or_missing_elements_is_400(server: Server) -> None:
    bodies: list[dict[str, Any]] = [{"elements": []}, {}, {"elements": {}}]
    for body in bodies:
        assert server.call("POST", "/experiences/events", json=body).status_code == 400


def test_oversized_body_is_refused_without_reading_it_all(server: Server) -> None:
    response = server.http.post(
        server.api + "/experiences/events",
        content=b"[" + b" " * (2 * 1024 * 1024) + b"]",
        headers=auth_headers(),
    )
    assert response.status_code == 413
    assert response.json()["title"] == "Payload Too Large"


def test_a_declared_oversized_body_is_refused_before_reading_a_byte() -> None:
    app = create_local_server(LocalBackend.default(), workspace_id=WORKSPACE, api_secret=SECRET)
    headers = [(k.lower().encode(), v.encode()) for k, v in auth_headers().items()]
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("the body was read")

    async def send(message: Message) -> None:
        sent.append(message)

    for declared in (str(MAX_BODY_BYTES + 1), "9" * 40):
        sent.clear()
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/experiences/fetch",
            "raw_path": b"/v1/experiences/fetch",
            "query_string": b"",
            "headers": [*headers, (b"content-length", declared.encode())],
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 1234),
        }
        anyio.run(app, scope, receive, send)
        assert sent[0]["status"] == 413


def _big_header(size: int) -> dict[str, str]:
    return {**auth_headers(), "X-Padding": "a" * size}


def test_request_heads_over_the_limit_are_refused_by_the_app_itself(
    in_process: TestClient,
) -> None:
    # Under uvicorn's httptools parser nothing else would stop them.
    metadata = "/v1/experiences/metadata"
    assert in_process.get(metadata, headers=_big_header(MAX_HEAD_BYTES - 1024)).status_code == 200
    too_many = in_process.get(metadata, headers=_big_header(MAX_HEAD_BYTES))
    assert too_many.status_code == 431
    assert too_many.json()["title"] == "Request Header Fields Too Large"
    too_long = in_process.get(metadata, params={"status": "A" * MAX_HEAD_BYTES})
    assert too_long.status_code == 414
    assert too_long.json()["title"] == "URI Too Long"


def test_uvicorn_alone_does_not_bound_request_heads(server: Server) -> None:
    # h11 refuses a head over 16 KiB only while it is incomplete: one that arrives in a
    # single read reaches the app, which refuses it (431); uvicorn answers 400 otherwise.
    response = server.http.get(server.api + "/experiences/metadata", headers=_big_header(100_000))
    assert response.status_code in (400, 431)


def _fastest_seconds(function: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return min(samples)


def test_a_224_kb_user_agent_costs_about_what_a_small_one_does(server: Server) -> None:
    # Regression: "Android" * 32,000 + "Mobile" took 5.6 s in the device rule.
    def fetch(user_agent: str) -> httpx.Response:
        body = {
            "identifiers": {"customer_id": "nobody-declared"},
            "experience_key": ["sidebar-promo"],
            "USER_AGENT": user_agent,
        }
        return server.call("POST", "/experiences/fetch", json=body)

    crafted = "Android" * (224 * 1024 // 7) + "Mobile"
    answer = fetch(crafted).json()["experiences"]["sidebar-promo"]["experience_context"]
    # Only the first 512 characters are classified: an Android there, no "Mobile": a tablet.
    assert answer["audience_name"] == "All Users"
    iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148"
    padded = fetch(iphone + " " * 224 * 1024).json()["experiences"]["sidebar-promo"]
    assert padded["experience_context"]["audience_name"] == "Mobile visitors"
    small_cost = _fastest_seconds(lambda: fetch(crafted[:3584] + "Mobile"), runs=10)
    large_cost = _fastest_seconds(lambda: fetch(crafted), runs=5)
    assert large_cost <= 200 * small_cost, (small_cost, large_cost)


def test_unknown_paths_and_methods_answer_json_errors(server: Server) -> None:
    missing = server.http.get(server.api + "/experiences/nope", headers=auth_headers())
    assert missing.status_code == 404
    assert missing.json()["title"] == "Not Found"
    wrong = server.http.get(server.api + "/experiences/fetch", headers=auth_headers())
    assert wrong.status_code == 405


def report_auth() -> tuple[str, str]:
    return (WORKSPACE, SECRET)


def test_report_is_served_beside_the_api(server: Server) -> None:
    redirect = server.http.get(server.base + "/report")
    assert redirect.status_code in (307, 302)
    page = server.http.get(server.base + "/report/", auth=report_auth())
    assert page.status_code == 200
    assert "Homepage hero banner" in page.text


@pytest.mark.parametrize("auth", [None, (WORKSPACE, SECRET + "x"), ("OTHER", SECRET)])
def test_regression_the_report_asks_for_the_apis_credentials(
    server: Server, auth: tuple[str, str] | None
) -> None:
    """It was served to anyone who could reach the port."""
    for path in ("/report/", "/report/report.json"):
        refused = server.http.get(server.base + path, auth=auth)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic ")
        assert "Homepage hero banner" not in refused.text and SECRET not in refused.text


def test_report_counts_events_sent_over_http_on_the_page_and_in_json(server: Server) -> None:
    context = hero_context(server)
    elements = [event_element(context), event_element(context, ACTION_CLICKED, b_id="<Buy>")]
    assert server.call("POST", "/experiences/events", json={"elements": elements}).is_success
    data = server.http.get(server.base + "/report/report.json", auth=report_auth())
    assert data.status_code == 200
    assert data.headers["content-type"] == "application/json"
    hero = next(e for e in data.json()["experiences"] if e["key"] == "hero-banner")
    assert (hero["total"]["impressions"], hero["total"]["clicks"]) == (1, 1)
    assert hero["b_ids"] == [{"label": "<Buy>", "impressions": 1, "clicks": 1, "ctr": 1.0}]
    assert hero["other_b_ids"] is None
    page = server.http.get(server.base + "/report/", auth=report_auth())
    assert "&lt;Buy&gt;" in page.text and "<Buy>" not in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")


def test_secret_is_never_in_an_answer(server: Server) -> None:
    bad = server.call("GET", "/experiences/metadata", headers=auth_headers(secret=SECRET + "x"))
    assert SECRET not in bad.text


def test_bad_workspace_id_is_refused_at_creation() -> None:
    with pytest.raises(ConfigurationError, match="workspace_id"):
        create_local_server(LocalBackend.default(), workspace_id="has space", api_secret="x")


@pytest.mark.anyio
async def test_our_client_works_against_the_local_server_over_http() -> None:
    backend = LocalBackend.default()
    app = create_local_server(backend, workspace_id=WORKSPACE, api_secret=SECRET)
    with run_asgi_server(app) as base:
        settings = PersonalizeSettings(
            workspace_id=WORKSPACE, api_secret=SECRET, base_url=base + "/v1"
        )
        async with PersonalizeClient(settings) as client:
            direct = await LocalBackend.default().fetch_experiences(
                ["hero-banner", "product-upsell", "email-landing-banner"],
                customer_id="bob",
                attributes={"utm_medium": "email"},
            )
            over_http = await client.fetch_experiences(
                ["hero-banner", "product-upsell", "email-landing-banner"],
                customer_id="bob",
                attributes={"utm_medium": "email"},
            )
            assert over_http == direct
            metadata = await client.fetch_metadata(["Active"])
            assert {m.key for m in metadata} == {
                "hero-banner",
                "sidebar-promo",
                "product-upsell",
                "email-landing-banner",
            }
            context = dict(over_http["hero-banner"].experience_context)
            await client.track_events([event_element(context)])  # type: ignore[list-item]
            assert len(backend.events) == 1
            with pytest.raises(BadRequestError):
                await client.fetch_experiences(
                    ["hero-banner"], customer_id="bob", attributes={"DAY_OF_THE_WEEK": "Funday"}
                )
        wrong = PersonalizeSettings(
            workspace_id=WORKSPACE, api_secret="nope", base_url=base + "/v1"
        )
        async with PersonalizeClient(wrong) as client:
            with pytest.raises(AuthenticationError):
                await client.fetch_metadata()


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "identifiers",
                    "customer_id",
                    "user_identifiers",
                    "experience_key",
                    "DAY_OF_THE_WEEK",
                    "TIME_OF_THE_DAY",
                    "USER_AGENT",
                    "elements",
                    "actions",
                    "attributes",
                    "action",
                    "event_time",
                    "platform",
                    "moe_event_uuid",
                    "user_timezone_offset",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def in_process() -> Iterator[TestClient]:
    app = create_local_server(LocalBackend.default(), workspace_id=WORKSPACE, api_secret=SECRET)
    with TestClient(app) as client:
        yield client


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_json, path=st.sampled_from(["/v1/experiences/fetch", "/v1/experiences/events"]))
def test_any_json_body_gets_200_or_400_never_a_500(
    in_process: TestClient, body: Any, path: str
) -> None:
    response = in_process.post(path, json=body, headers=auth_headers())
    assert response.status_code in (200, 400), response.text
    validate_response("POST", path, response.status_code, response.content)
