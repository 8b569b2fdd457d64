"""Contract tests against the published spec (tests/spec/, patched per WIRE.md).

Every request the client sends goes through a MockTransport that validates it against
the spec; every response example in the spec is fed back through the client.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from personalize_middleware import (
    AuthenticationError,
    BadRequestError,
    EventElement,
    Experience,
    PersonalizeClient,
    PersonalizeSettings,
)
from tests.support.spec import (
    SpecExample,
    SpecViolation,
    iter_request_examples,
    iter_response_examples,
    spec_dict,
    validate_request,
    validate_response,
)

WORKSPACE = "WS_CONTRACT"
SECRET = "contract-secret-123"
SETTINGS = PersonalizeSettings(workspace_id=WORKSPACE, api_secret=SECRET, data_center="01")

MATCHED = next(e for e in iter_response_examples() if e.name == "Matched Experience").body
CONTEXT = MATCHED["experiences"]["homepage-banner"]["experience_context"]


class SpecCheckingTransport(httpx.MockTransport):
    """Validates and records every request; answers with spec-shaped bodies."""

    def __init__(self, answer: httpx.Response | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = answer
        super().__init__(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        validate_request(request, workspace_id=WORKSPACE, api_secret=SECRET)
        self.requests.append(request)
        if self.answer is not None:
            return self.answer
        if request.url.path.endswith("/fetch"):
            keys = json.loads(request.content)["experience_key"]
            one = MATCHED["experiences"]["homepage-banner"]
            return httpx.Response(200, json={"experiences": {k: one for k in keys}})
        if request.url.path.endswith("/metadata"):
            return httpx.Response(200, json={"metadata": {"count": 0, "experiences": []}})
        return httpx.Response(200, json={"status": "success", "message": "ok", "req_id": "x"})

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) for r in self.requests]


def _client(transport: SpecCheckingTransport) -> PersonalizeClient:
    return PersonalizeClient(SETTINGS, transport=transport)


def _element(i: int, *, click: bool = False) -> EventElement:
    attributes: dict[str, Any] = dict(CONTEXT)  # the fetched context, copied whole
    if click:
        attributes["b_id"] = "Add to Cart"  # WIRE.md: inside attributes, like the examples
    element: EventElement = {
        "customer_id": f"user-{i}",
        "user_timezone_offset": 19800,
        "actions": [
            {
                "action": "MOE_PERSONALIZATION_MESSAGE_CLICKED"
                if click
                else "MOE_PERSONALIZATION_MESSAGE_SHOWN",
                "moe_event_uuid": f"aa886712-4537-47c1-b126-{i:012x}",
                "event_time": 1725258666,
                "platform": "web",
                "attributes": attributes,
            }
        ],
    }
    if i % 7 == 0:
        element["user_attributes"] = {"first_name": "Jane"}
    return element


# -- requests ---------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("identity", "expected_identifiers"),
    [
        ({"customer_id": "user_8821"}, {"customer_id": "user_8821"}),
        (
            {"user_identifiers": {"u_em": "jane@example.com", "u_mb": "+919876543210"}},
            {"user_identifiers": {"u_em": "jane@example.com", "u_mb": "+919876543210"}},
        ),
        (
            {"customer_id": "user_8821", "user_identifiers": {"u_em": "jane@example.com"}},
            {"customer_id": "user_8821", "user_identifiers": {"u_em": "jane@example.com"}},
        ),
    ],
    ids=["customer_id", "user_identifiers", "both"],
)
async def test_fetch_request_identities(
    identity: dict[str, Any], expected_identifiers: dict[str, Any]
) -> None:
    transport = SpecCheckingTransport()
    async with _client(transport) as client:
        result = await client.fetch_experiences(["homepage-banner"], **identity)
    assert list(result) == ["homepage-banner"]
    (body,) = transport.bodies()
    assert body == {"identifiers": expected_identifiers, "experience_key": ["homepage-banner"]}
    (request,) = transport.requests
    assert str(request.url) == "https://sdk-01.moengage.com/v1/experiences/fetch"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("personalize-middleware/")


@pytest.mark.anyio
async def test_fetch_request_with_in_session_attributes() -> None:
    attributes = {
        "DAY_OF_THE_WEEK": "Monday",
        "TIME_OF_THE_DAY": "07",
        "USER_IP_ADDRESS": "203.0.113.42",
        "USER_AGENT": "Mozilla/5.0 (Linux; Android 13)",
        "utm_medium": "email",
    }
    transport = SpecCheckingTransport()
    async with _client(transport) as client:
        await client.fetch_experiences(["a", "b"], customer_id="u1", attributes=attributes)
    (body,) = transport.bodies()
    assert body == {"identifiers": {"customer_id": "u1"}, "experience_key": ["a", "b"]} | (
        attributes
    )


@pytest.mark.anyio
async def test_fetch_request_with_thirty_keys_validates_in_two_calls() -> None:
    keys = [f"key-{i}" for i in range(30)]
    transport = SpecCheckingTransport()
    async with _client(transport) as client:
        result = await client.fetch_experiences(keys, user_identifiers={"u_em": "a@b.c"})
    assert sorted(result) == sorted(keys)
    assert [b["experience_key"] for b in transport.bodies()] == [keys[:25], keys[25:]]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("statuses", "query"),
    [
        (None, b""),
        (["Active"], b"status=Active"),
        (["Active", "Paused"], b"status=Active,Paused"),
        (("Scheduled", "Active", "Scheduled"), b"status=Scheduled,Active"),
        ("Active,Paused,Scheduled", b"status=Active,Paused,Scheduled"),
    ],
)
async def test_metadata_request(statuses: Any, query: bytes) -> None:
    transport = SpecCheckingTransport()
    async with _client(transport) as client:
        assert await client.fetch_metadata(statuses) == []
    (request,) = transport.requests
    assert request.method == "GET"
    assert request.url.path == "/v1/experiences/metadata"
    assert request.url.query == query


@pytest.mark.anyio
async def test_events_request_of_150_elements_with_a_click() -> None:
    elements = [_element(i, click=i % 50 == 3) for i in range(150)]
    transport = SpecCheckingTransport()
    async with _client(transport) as client:
        await client.track_events(elements)
    bodies = transport.bodies()
    assert [len(b["elements"]) for b in bodies] == [100, 50]
    assert bodies[0]["elements"][3]["actions"][0]["attributes"]["b_id"] == "Add to Cart"
    assert bodies[0]["elements"][3]["actions"][0]["attributes"]["experience_type"] == (
        "API based Experience"
    )  # unknown context fields travel back too


def _raw(method: str, path: str, body: Any, **headers: str) -> httpx.Request:
    auth = httpx.BasicAuth(WORKSPACE, SECRET)
    request = httpx.Request(
        method,
        "https://sdk-01.moengage.com/v1" + path,
        json=body,
        headers={"MOE-APPKEY": WORKSPACE, **headers},
    )
    return next(auth.auth_flow(request))


@pytest.mark.parametrize(
    ("body", "mistake"),
    [
        ({"identifiers": {"customer_id": "u"}, "DAY_OF_THE_WEEK": "funday"}, "DAY_OF_THE_WEEK"),
        ({"identifiers": {"customer_id": "u"}, "TIME_OF_THE_DAY": "7"}, "TIME_OF_THE_DAY"),
        ({"identifiers": {"customer_id": "u"}, "experience_key": ["k"] * 26}, "too long"),
        ({"identifiers": {"user_identifiers": "a@b.c"}}, "object"),
        ({"identifiers": {"customer_id": 5}}, "string"),
    ],
)
def test_validator_rejects_bad_fetch_bodies(body: Any, mistake: str) -> None:
    with pytest.raises(SpecViolation):
        validate_request(_raw("POST", "/experiences/fetch", body))


def test_validator_rejects_bad_event_bodies() -> None:
    good = {"elements": [_element(1, click=True)]}
    validate_request(_raw("POST", "/experiences/events", good))
    mutations: list[Callable[[dict[str, Any]], object]] = [
        lambda a: a["attributes"].update(b_id=7),
        lambda a: a["attributes"].pop("cid"),
        lambda a: a.update(action="CLICK"),
        lambda a: a.update(moe_event_uuid="nope"),
        lambda a: a.update(event_time="soon"),
        lambda a: a.update(attributes="cid"),
    ]
    for mutate in mutations:
        bad = json.loads(json.dumps(good))
        mutate(bad["elements"][0]["actions"][0])
        with pytest.raises(SpecViolation):
            validate_request(_raw("POST", "/experiences/events", bad))
    too_many = {"elements": [_element(i) for i in range(101)]}
    with pytest.raises(SpecViolation):
        validate_request(_raw("POST", "/experiences/events", too_many))


def test_validator_checks_auth_headers() -> None:
    body = {"identifiers": {"customer_id": "u"}}
    request = _raw("POST", "/experiences/fetch", body)
    validate_request(request, workspace_id=WORKSPACE, api_secret=SECRET)
    with pytest.raises(SpecViolation, match="API secret"):
        validate_request(request, api_secret="other")
    del request.headers["MOE-APPKEY"]
    with pytest.raises(SpecViolation, match="MOE-APPKEY"):
        validate_request(request)
    del request.headers["Authorization"]
    with pytest.raises(SpecViolation, match="Authorization"):
        validate_request(request)


@pytest.mark.parametrize("example", list(iter_request_examples()), ids=lambda e: e.id)
def test_spec_request_examples_validate_against_the_patched_spec(example: SpecExample) -> None:
    validate_request(_raw(example.method, example.path, example.body))


def test_the_user_identifiers_quirk_is_real() -> None:
    # Pins WIRE.md quirk 1: unpatched, the spec rejects its own example's object.
    from tests.support import spec

    raw = spec._raw_spec()["paths"]["/experiences/fetch"]["post"]["requestBody"]
    schema = raw["content"]["application/json"]["schema"]["properties"]["identifiers"]
    assert schema["properties"]["user_identifiers"]["type"] == "string"
    patched = spec_dict()["paths"]["/experiences/fetch"]["post"]["requestBody"]
    props = patched["content"]["application/json"]["schema"]["properties"]["identifiers"]
    assert props["properties"]["user_identifiers"]["type"] == "object"


# -- responses ---------------------------------------------------------------------------

RESPONSE_EXAMPLES = list(iter_response_examples())


def test_every_endpoint_has_response_examples() -> None:
    endpoints = {(e.method, e.path, e.status) for e in RESPONSE_EXAMPLES}
    for path in ("/experiences/fetch", "/experiences/metadata", "/experiences/events"):
        method = "GET" if path.endswith("metadata") else "POST"
        assert {(method, path, 200), (method, path, 400), (method, path, 401)} <= endpoints


@pytest.mark.parametrize("example", RESPONSE_EXAMPLES, ids=lambda e: e.id)
def test_spec_response_examples_match_their_schemas(example: SpecExample) -> None:
    assert example.status is not None
    validate_response(example.method, example.path, example.status, example.body)


async def _call(client: PersonalizeClient, path: str) -> Any:
    if path == "/experiences/fetch":
        return await client.fetch_experiences(["homepage-banner"], customer_id="user_8821")
    if path == "/experiences/metadata":
        return await client.fetch_metadata(["Active"])
    return await client.track_events([_element(1)])


@pytest.mark.anyio
@pytest.mark.parametrize("example", RESPONSE_EXAMPLES, ids=lambda e: e.id)
async def test_spec_response_examples_through_the_client(example: SpecExample) -> None:
    assert example.status is not None
    transport = SpecCheckingTransport(httpx.Response(example.status, json=example.body))
    async with _client(transport) as client:
        if example.status == 200:
            result = await _call(client, example.path)
            _check_parsed(example, result)
            return
        expected = AuthenticationError if example.status == 401 else BadRequestError
        with pytest.raises(expected) as caught:
            await _call(client, example.path)
    error = caught.value
    assert error.status_code == example.status
    if isinstance(error, BadRequestError):
        assert error.title == example.body["title"]
        assert error.description == example.body["description"]
        assert error.code == example.body.get("code")


def _check_parsed(example: SpecExample, result: Any) -> None:
    if example.path == "/experiences/fetch":
        assert set(result) == set(example.body["experiences"])
        for key, experience in result.items():
            raw = example.body["experiences"][key]
            assert isinstance(experience, Experience)
            assert dict(experience.experience_context) == raw["experience_context"]
            assert dict(experience.payload) == {
                name: item["value"] for name, item in raw["payload"].items()
            }
            assert experience.to_api() == raw
    elif example.path == "/experiences/metadata":
        entries = example.body["metadata"]["experiences"]
        assert len(result) == example.body["metadata"]["count"] == len(entries)
        assert [(m.key, m.name, m.status) for m in result] == [
            (e["experience_key"], e["experience_name"], e["status"]) for e in entries
        ]
    else:
        assert result is None
