"""The beacon endpoint over a tiny ASGI app: 204 / 400 / 403 / 413, origin checks,
replay dedupe, the script, and never a 500."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from personalize_middleware import ExperienceStore, Identity, Personalization
from personalize_middleware._models import ACTION_CLICKED, ACTION_SHOWN
from personalize_middleware._signing import Keyring
from personalize_middleware.tracking import Tracking, TrackingToken, encode_token
from tests.support.spec import validate_request_parts
from tests.support.tracking_helpers import BROWSER_USER_AGENT, StaticBackend, context_for

KEYRING = Keyring(["endpoint-test-secret-0123456789"])
ALICE = Identity(customer_id="alice")
BOB = Identity(customer_id="bob")
ORIGIN = "http://testserver"


def make_token(
    identity: Identity = ALICE,
    *,
    key: str = "hero",
    b_id: str | None = None,
    render_id: str = "render-1",
    expires: float | None = None,
    keyring: Keyring = KEYRING,
) -> str:
    return encode_token(
        keyring,
        identity,
        TrackingToken(
            kind="shown" if b_id is None else "clicked",
            key=key,
            context=context_for(key),
            render_id=render_id,
            expires=int(time.time() + 600 if expires is None else expires),
            b_id=b_id,
        ),
    )


def identity_app(tracking: Tracking) -> Any:
    """The identity is the ``uid`` cookie (``None`` without one), like the middleware's."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        identity = None
        for name, value in scope["headers"]:
            if name == b"cookie":
                morsel = SimpleCookie(value.decode()).get("uid")
                if morsel is not None:
                    identity = Identity(customer_id=morsel.value)
        assert tracking.matches(scope["path"])
        await tracking.handle(scope, receive, send, identity)

    return app


@pytest.fixture
async def env() -> AsyncIterator[tuple[Tracking, StaticBackend, httpx.AsyncClient]]:
    backend = StaticBackend({})
    tracking = Tracking(keyring=KEYRING, backend=backend, allowed_origins=["https://shop.example"])
    await tracking.start()
    transport = httpx.ASGITransport(app=identity_app(tracking))
    async with httpx.AsyncClient(
        transport=transport,
        base_url=ORIGIN,
        cookies={"uid": "alice"},
        headers={"user-agent": BROWSER_USER_AGENT},
    ) as client:
        yield tracking, backend, client
    await tracking.aclose()


async def beacon(client: httpx.AsyncClient, events: Any, **headers: str) -> httpx.Response:
    sent = {"origin": ORIGIN, "sec-fetch-site": "same-origin", **headers}
    body = events if isinstance(events, bytes) else json.dumps({"events": events}).encode()
    return await client.post("/_personalize/events", content=body, headers=sent)


def delivered(backend: StaticBackend) -> list[dict[str, Any]]:
    return [
        {**action, "customer_id": element["customer_id"]}
        for element in backend.events
        for action in element["actions"]
    ]


@pytest.mark.anyio
async def test_accepted_events_become_spec_valid_actions(env: Any) -> None:
    tracking, backend, client = env
    before = int(time.time())
    response = await beacon(client, [make_token(), make_token(b_id="Add to Cart")])
    assert response.status_code == 204
    assert response.content == b""
    await tracking.batcher.flush()
    assert len(backend.events) == 1  # one user: one element with both actions
    element = backend.events[0]
    assert element["customer_id"] == "alice"
    shown, clicked = element["actions"]
    assert shown["action"] == ACTION_SHOWN and clicked["action"] == ACTION_CLICKED
    assert shown["attributes"] == context_for("hero")
    assert clicked["attributes"] == {**context_for("hero"), "b_id": "Add to Cart"}
    for action in (shown, clicked):
        assert uuid.UUID(action["moe_event_uuid"]).version == 4
        assert isinstance(action["event_time"], int)
        assert before <= action["event_time"] <= time.time() + 1
        assert action["platform"] == "web"
    assert shown["moe_event_uuid"] != clicked["moe_event_uuid"]
    body = json.dumps({"elements": backend.events}).encode()
    auth = base64.b64encode(b"WS:secret").decode()
    validate_request_parts(
        "POST",
        "https://sdk-01.moengage.com/v1/experiences/events",
        {"Authorization": f"Basic {auth}", "MOE-APPKEY": "WS", "Content-Type": "application/json"},
        body,
    )
    assert tracking.stats.accepted == 2 and tracking.stats.sent == 2


@pytest.mark.anyio
async def test_anonymous_visitor_is_reported_by_visitor_id() -> None:
    backend = StaticBackend({})
    tracking = Tracking(keyring=KEYRING, backend=backend)
    visitor = Identity(visitor_id="v-123")
    scope_headers = [(b"host", b"testserver"), (b"origin", ORIGIN.encode())]
    body = json.dumps({"events": [make_token(visitor)]}).encode()
    status = await _call(tracking, "POST", "/_personalize/events", scope_headers, body, visitor)
    assert status == 204
    await tracking.batcher.flush()
    assert [e["customer_id"] for e in backend.events] == ["v-123"]
    await tracking.aclose()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b"{}",
        b'{"events": []}',
        b'{"events": "token"}',
        b'{"events": [1]}',
        b'{"events": [null]}',
        b'{"events": [{"t": "x"}]}',
        b"[" * 100_00 + b"]" * 100_00,
    ],
)
@pytest.mark.anyio
async def test_malformed_body_is_400(env: Any, body: bytes) -> None:
    tracking, backend, client = env
    response = await beacon(client, body)
    assert response.status_code == 400
    assert tracking.stats.rejected_malformed == 1
    await tracking.batcher.flush()
    assert backend.events == []


@pytest.mark.parametrize(
    "tokens",
    [
        pytest.param([make_token(BOB)], id="other-visitor"),
        pytest.param([make_token(expires=time.time() - 1)], id="expired"),
        pytest.param([make_token()[:-2] + "AA"], id="tampered-signature"),
        pytest.param(["A" + make_token()[1:]], id="tampered-payload"),
        pytest.param([make_token(keyring=Keyring(["some-other-key-0123456789"]))], id="other-key"),
        pytest.param([make_token(), make_token(BOB, b_id="Wishlist")], id="one-bad-among-good"),
        pytest.param(["not-a-token"], id="garbage"),
    ],
)
@pytest.mark.anyio
async def test_bad_tokens_are_403_and_nothing_is_forwarded(env: Any, tokens: list[str]) -> None:
    tracking, backend, client = env
    response = await beacon(client, tokens)
    assert response.status_code == 403
    assert tracking.stats.rejected_forbidden == 1
    await tracking.batcher.flush()
    assert backend.events == []
    assert tracking.stats.queued == 0


@pytest.mark.anyio
async def test_visitor_without_identity_is_403(env: Any) -> None:
    tracking, backend, client = env
    client.cookies.clear()
    assert (await beacon(client, [make_token()])).status_code == 403
    await tracking.batcher.flush()
    assert backend.events == []


@pytest.mark.anyio
async def test_oversized_bodies_are_413(env: Any) -> None:
    tracking, _backend, client = env
    # Declared too large: refused before reading.
    big = json.dumps({"events": [make_token()], "pad": "x" * 70_000}).encode()
    assert (await beacon(client, big)).status_code == 413

    # Streamed without a Content-Length: counted while reading, refused past 64 KiB.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"events": ["'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"]}'

    response = await client.post(
        "/_personalize/events",
        content=chunks(),
        headers={"origin": ORIGIN, "sec-fetch-site": "same-origin"},
    )
    assert response.status_code == 413
    # A lying Content-Length is not trusted either: handled at the ASGI level below.
    too_many = [make_token(render_id=f"r{i}") for i in range(51)]
    assert (await beacon(client, too_many)).status_code == 413
    assert (await beacon(client, too_many[:50])).status_code == 204
    assert tracking.stats.rejected_too_large == 3


@pytest.mark.anyio
async def test_body_larger_than_its_content_length_claims_is_413() -> None:
    tracking = Tracking(keyring=KEYRING, backend=StaticBackend({}), max_body=1000)
    headers = [(b"host", b"testserver"), (b"content-length", b"10")]
    status = await _call(tracking, "POST", "/_personalize/events", headers, b"x" * 5000, ALICE)
    assert status == 413


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"sec-fetch-site": "cross-site"}, 403),
        ({"sec-fetch-site": "same-site"}, 403),
        ({"origin": "http://evil.example"}, 403),
        ({"origin": "null"}, 403),
        ({"origin": "http://testserver:8080"}, 403),
        ({"origin": "http://testserver.evil.example"}, 403),
        ({"origin": "https://shop.example", "sec-fetch-site": "cross-site"}, 204),  # allowed
        ({"origin": "https://testserver"}, 204),  # TLS ended at a proxy: scheme not compared
        ({"sec-fetch-site": "none"}, 204),
    ],
)
@pytest.mark.anyio
async def test_cross_site_beacons_are_refused(
    env: Any, headers: dict[str, str], status: int
) -> None:
    tracking, backend, client = env
    response = await beacon(client, [make_token()], **headers)
    assert response.status_code == status
    await tracking.batcher.flush()
    assert len(backend.events) == (1 if status == 204 else 0)
    assert tracking.stats.rejected_cross_site == (1 if status == 403 else 0)


@pytest.mark.anyio
async def test_request_without_origin_headers_is_accepted(env: Any) -> None:
    """Non-browser clients send neither header; they carry no victim's cookies anyway."""
    tracking, backend, client = env
    body = json.dumps({"events": [make_token()]}).encode()
    response = await client.post("/_personalize/events", content=body)
    assert response.status_code == 204
    await tracking.batcher.flush()
    assert len(backend.events) == 1


@pytest.mark.anyio
async def test_replayed_events_are_forwarded_once(env: Any) -> None:
    tracking, backend, client = env
    shown, click = make_token(), make_token(b_id="Add to Cart")
    assert (await beacon(client, [shown, click])).status_code == 204
    assert (await beacon(client, [shown, click])).status_code == 204  # replay
    assert (await beacon(client, [shown, shown])).status_code == 204
    # A freshly signed token for the same page view and element is the same event too.
    assert (await beacon(client, [make_token(b_id="Add to Cart")])).status_code == 204
    # Another button, or another page view, is another event.
    assert (await beacon(client, [make_token(b_id="Wishlist")])).status_code == 204
    assert (await beacon(client, [make_token(render_id="render-2")])).status_code == 204
    await tracking.batcher.flush()
    events = delivered(backend)
    assert len(events) == 4
    assert len({e["moe_event_uuid"] for e in events}) == 4
    assert tracking.stats.replays == 5


@pytest.mark.anyio
async def test_event_uuid_is_the_same_in_every_worker() -> None:
    """A replay that reaches another process carries the same moe_event_uuid, so MoEngage
    deduplicates it; different events get different uuids."""
    uuids = []
    for _ in range(2):
        backend = StaticBackend({})
        tracking = Tracking(keyring=KEYRING, backend=backend)
        body = json.dumps({"events": [make_token(), make_token(b_id="Wishlist")]}).encode()
        headers = [(b"host", b"testserver")]
        assert await _call(tracking, "POST", "/_personalize/events", headers, body, ALICE) == 204
        await tracking.batcher.flush()
        uuids.append([a["moe_event_uuid"] for a in delivered(backend)])
        await tracking.aclose()
    assert uuids[0] == uuids[1]
    assert len(set(uuids[0])) == 2


@pytest.mark.anyio
async def test_routing_404_and_405(env: Any) -> None:
    tracking, _backend, client = env
    assert (await client.get("/_personalize/events")).status_code == 405
    assert (await client.get("/_personalize/events")).headers["allow"] == "POST"
    assert (await client.post(tracking.script_path)).status_code == 405
    assert (await client.get("/_personalize/nothing")).status_code == 404
    assert (await client.get("/_personalize")).status_code == 404


@pytest.mark.anyio
async def test_script_is_served_immutable_with_its_hash(env: Any) -> None:
    tracking, _backend, client = env
    assert re.fullmatch(r"/_personalize/personalize\.[0-9a-f]{12}\.js", tracking.script_path)
    response = await client.get(tracking.script_path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert response.headers["x-content-type-options"] == "nosniff"
    digest = base64.b64encode(hashlib.sha256(response.content).digest()).decode()
    assert tracking.script_hash == f"sha256-{digest}"
    assert hashlib.sha256(response.content).hexdigest()[:12] in tracking.script_path
    assert b"sendBeacon" in response.content and b"eval(" not in response.content
    etag = response.headers["etag"]
    cached = await client.get(tracking.script_path, headers={"if-none-match": etag})
    assert cached.status_code == 304 and cached.content == b""
    head = await client.head(tracking.script_path)
    assert head.status_code == 200 and head.content == b""
    plain = await client.get("/_personalize/personalize.js")
    assert plain.content == response.content
    assert plain.headers["cache-control"] == "public, max-age=300"


@pytest.mark.anyio
async def test_internal_error_is_400_and_logged(
    env: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tracking, _backend, client = env

    def broken(*args: object) -> bool:
        raise RuntimeError("bug")

    monkeypatch.setattr(tracking.batcher, "enqueue", broken)
    with caplog.at_level(logging.ERROR, "personalize_middleware"):
        response = await beacon(client, [make_token()])
    assert response.status_code == 400
    assert "tracking endpoint failed" in caplog.text


@pytest.mark.anyio
async def test_client_gone_mid_body_gets_no_answer() -> None:
    tracking = Tracking(keyring=KEYRING, backend=StaticBackend({}))
    sent: list[Message] = []
    messages = iter(
        [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
    )

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = _scope("POST", "/_personalize/events", [(b"host", b"testserver")])
    await tracking.handle(scope, receive, send, ALICE)
    assert sent == []


@pytest.mark.anyio
async def test_server_side_impressions_are_recorded_once_at_render() -> None:
    backend = StaticBackend({"hero": {"Title": "Hi"}})
    tracking = Tracking(keyring=KEYRING, backend=backend, impressions="server")

    async def identity() -> Identity:
        return ALICE

    handle = Personalization(
        store=ExperienceStore(backend),
        keys=("hero",),
        attributes={},
        budget=2.0,
        identity_factory=identity,
        tracking=tracking,
    )
    await handle.start()
    await handle.wait()
    hero = handle.experience("hero")
    assert hero is not None
    assert tracking.impression_attrs(handle, hero) == ""
    assert tracking.impression_attrs(handle, hero) == ""  # rendered twice: one impression
    assert "data-pz-click=" in tracking.click_attrs(handle, hero, "Add to Cart")
    await tracking.batcher.flush()
    events = delivered(backend)
    assert [(e["action"], e["customer_id"]) for e in events] == [(ACTION_SHOWN, "alice")]
    assert events[0]["attributes"] == context_for("hero")
    assert tracking.stats.server_impressions == 1
    await tracking.aclose()


# -- never a 500 ---------------------------------------------------------------------------

_SYNC_TRACKING = Tracking(keyring=KEYRING, backend=StaticBackend({}))
_SYNC_CLIENT = TestClient(identity_app(_SYNC_TRACKING), cookies={"uid": "alice"})
_GOOD = [make_token(render_id=f"h{i}") for i in range(3)]

_token_like = st.one_of(
    st.sampled_from(_GOOD),
    st.text(max_size=50),
    st.builds(
        lambda t, i, c: t[:i] + c + t[i + 1 :],
        st.sampled_from(_GOOD),
        st.integers(0, 200),
        st.characters(),
    ),
    st.integers(),
    st.none(),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda e: json.dumps({"events": e}).encode(), st.lists(_token_like, max_size=60)),
    st.builds(
        lambda e, enc: json.dumps({"events": e}).encode(enc),
        st.lists(st.sampled_from(_GOOD), min_size=1, max_size=3),
        st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1"]),
    ),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=6), children, max_size=4)
        ),
        max_leaves=12,
    ).map(lambda value: json.dumps(value).encode()),
)
_headers = st.fixed_dictionaries(
    {},
    optional={
        "origin": st.sampled_from([ORIGIN, "null", "http://evil.example", "http://[::1", "%%"]),
        "sec-fetch-site": st.sampled_from(["same-origin", "cross-site", "none", "bogus"]),
        "content-type": st.sampled_from(["application/json", "text/plain", "x/y; charset=bad"]),
        "host": st.sampled_from(["testserver", "testserver:99999", "[::1]:80", "a:b:c"]),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, headers=_headers)
def test_random_beacons_never_500(body: bytes, headers: dict[str, str]) -> None:
    response = _SYNC_CLIENT.post("/_personalize/events", content=body, headers=headers)
    assert response.status_code in (204, 400, 403, 413)


# -- raw ASGI helpers ----------------------------------------------------------------------


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": headers,
        "query_string": b"",
    }


async def _call(
    tracking: Tracking,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    identity: Identity | None,
) -> int:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await tracking.handle(_scope(method, path, headers), receive, send, identity)
    return int(sent[0]["status"])
