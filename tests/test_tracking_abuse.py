"""Honest campaign numbers under attack: token replay without rendering, human timing,
rates per page view / visitor / address, crawlers, and slow beacon bodies.

The attacks run as they did in the attack run: a script over real HTTP against the app
served by uvicorn on 127.0.0.1 (a fake wall clock stands in where the scenario is "the
script waited"); the rules are pinned at the ASGI level with tokens of a known age."""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jinja2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import Message, Receive, Scope, Send

from personalize_middleware import Identity, PersonalizeMiddleware, setup_templates
from personalize_middleware._exceptions import ConfigurationError
from personalize_middleware._signing import Keyring
from personalize_middleware.tracking import Tracking, TrackingLimits, TrackingToken, encode_token
from personalize_middleware.tracking._guard import address_key
from tests.support.http_server import run_asgi_server
from tests.support.tracking_helpers import (
    BROWSER_USER_AGENT,
    GOOGLEBOT_USER_AGENT,
    FakeClock,
    StaticBackend,
    beacon,
    context_for,
    hook_values,
)

SECRET = "abuse-test-secret-0123456789"
KEYRING = Keyring.from_config(SECRET)
EVENTS = "/_personalize/events"

PAGE = """\
{% experience "hero" as hero %}<section{{ impression(hero) }}><h1>{{ hero.Title }}</h1>\
<button{{ track_click(hero, "Add to Cart") }}>Add</button>\
<button{{ track_click(hero, "Wishlist") }}>Wish</button></section>{% endexperience %}
{% experience "promo" as promo %}<aside{{ impression(promo) }}>{{ promo.Title }}</aside>\
{% endexperience %}
{{ personalize_script() }}"""
TOKENS_PER_PAGE = 4  # two impressions, two clicks


def experiences() -> StaticBackend:
    return StaticBackend({"hero": {"Title": "Sale"}, "promo": {"Title": "Free shipping"}})


def shop(backend: StaticBackend, tracking: Tracking) -> PersonalizeMiddleware:
    templates = Jinja2Templates(
        env=jinja2.Environment(
            loader=jinja2.DictLoader({"page.html": PAGE}), autoescape=jinja2.select_autoescape()
        )
    )
    setup_templates(templates)

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html")

    return PersonalizeMiddleware(
        Starlette(routes=[Route("/", page)]),
        backend=backend,
        routes={"/": ["hero", "promo"]},
        secret_key=SECRET,
        metadata_refresh=None,
        latency_budget=5.0,
        tracking=tracking,
    )


class PageHooks(list[str]):
    """A page's hook values (tokens, or indexes into its manifest) and the body of the
    beacon the script would send for them (``body``: with the manifest)."""

    def __init__(self, text: str) -> None:
        super().__init__(hook_values(text))
        self.body = beacon(text, list(self))


def page_tokens(text: str) -> PageHooks:
    return PageHooks(text)


def delivered(backend: StaticBackend) -> list[Any]:
    return [action for element in backend.events for action in element["actions"]]


# == 1. the replay script, over real HTTP ======================================================


def replay(base: str, pages: int, *, beacon_user_agent: str | None = None) -> float:
    """The attack run's script: fetch pages, POST every hook's token found, never render
    anything; it poses as a browser (or beacons as ``beacon_user_agent``). Returns the
    median seconds from a page's arrival to its beacon's."""
    delays = []
    beacon_headers = {"user-agent": beacon_user_agent} if beacon_user_agent else {}
    client = httpx.Client(base_url=base, headers={"user-agent": BROWSER_USER_AGENT})
    try:
        for _ in range(pages):
            page = client.get("/")
            fetched = time.monotonic()
            tokens = page_tokens(page.text)
            assert len(tokens) == TOKENS_PER_PAGE, page.text
            answer = client.post(EVENTS, json=tokens.body, headers=beacon_headers)
            delays.append(time.monotonic() - fetched)
            assert answer.status_code == 204  # the same answer as for a person's beacon
    finally:
        client.close()
    return statistics.median(delays)


def test_token_replay_of_100_pages_counts_nothing() -> None:
    """The attack run: 100 pages, every token POSTed, 400 events accepted. Now 0."""
    backend = experiences()
    tracking = Tracking(keyring=KEYRING, backend=backend)
    with run_asgi_server(shop(backend, tracking), lifespan="on") as base:
        delay = replay(base, 100)
    stats = tracking.stats
    assert delay < tracking.limits.min_click_delay  # the script does not wait
    assert stats.beacons == 100
    assert stats.accepted == 0 and delivered(backend) == []  # the shutdown flushed nothing
    assert stats.rejected_too_soon == 100 * TOKENS_PER_PAGE


def test_a_script_with_its_own_user_agent_gets_no_tokens_and_no_hearing() -> None:
    backend = experiences()
    tracking = Tracking(keyring=KEYRING, backend=backend)
    with run_asgi_server(shop(backend, tracking), lifespan="on") as base:
        with httpx.Client(base_url=base) as client:  # python-httpx/x.y: on the list
            for _ in range(10):
                page = client.get("/")
                assert "<h1>Sale</h1>" in page.text and page_tokens(page.text) == []
        # Tokens got by posing as a browser, beaconed as itself: ignored unread.
        replay(base, 20, beacon_user_agent="python-requests/2.32.3")
    stats = tracking.stats
    assert stats.bot_page_views == 10 and stats.rejected_bot == 20
    assert stats.accepted == stats.rejected_too_soon == 0 and delivered(backend) == []


def test_tokens_refused_as_too_early_stay_refused_later() -> None:
    backend, clock = experiences(), FakeClock()
    tracking = Tracking(keyring=KEYRING, backend=backend, clock=clock)
    with run_asgi_server(shop(backend, tracking), lifespan="on") as base:
        client = httpx.Client(base_url=base, headers={"user-agent": BROWSER_USER_AGENT})
        with client:
            pages = [page_tokens(client.get("/").text) for _ in range(10)]
            for tokens in pages:
                assert client.post(EVENTS, json=tokens.body).status_code == 204
            clock.advance(5)  # a person could have seen and clicked all of it by now
            for tokens in pages:
                assert client.post(EVENTS, json=tokens.body).status_code == 204
    stats = tracking.stats
    assert (stats.accepted, stats.rejected_too_soon, stats.replays) == (0, 40, 40)
    assert delivered(backend) == []


def test_a_patient_script_is_held_to_a_persons_rate() -> None:
    """Waiting out the dwell gets a script no further than a person's rate a minute:
    one visitor gets ``visitor_events_per_minute``, a new visitor per page does not get
    around the per-address rate."""
    backend, clock = experiences(), FakeClock()
    limits = TrackingLimits(visitor_events_per_minute=120, ip_events_per_minute=300)
    tracking = Tracking(keyring=KEYRING, backend=backend, clock=clock, limits=limits)
    with run_asgi_server(shop(backend, tracking), lifespan="on") as base:
        one = httpx.Client(base_url=base, headers={"user-agent": BROWSER_USER_AGENT})
        with one:
            pages = [page_tokens(one.get("/").text) for _ in range(100)]
            clock.advance(2)
            for tokens in pages:
                assert one.post(EVENTS, json=tokens.body).status_code == 204
            assert tracking.stats.accepted == 120  # of 400: one visitor's minute
            # Now a fresh anonymous visitor for each page, from the same address.
            many = []
            for _ in range(100):
                one.cookies.clear()
                page = one.get("/")
                visitor = page.headers["set-cookie"].split(";")[0]
                many.append((visitor, page_tokens(page.text)))
            one.cookies.clear()
            clock.advance(2)
            for visitor, tokens in many:
                answer = one.post(EVENTS, json=tokens.body, headers={"cookie": visitor})
                assert answer.status_code == 204
    # The address had spent 120 of its 300 on the first run and refilled 10 in 2 s.
    assert tracking.stats.accepted == 120 + 180 + 10
    assert tracking.stats.rejected_rate == 800 - tracking.stats.accepted
    assert len(delivered(backend)) == tracking.stats.accepted


# == 2. the rules, at the ASGI level ============================================================


class Site:
    """A Tracking on a fake clock behind a minimal app: the visitor is the ``uid`` cookie,
    the client address the ``x-ip`` header (as the middleware's ``client_ip``)."""

    def __init__(self, **options: Any) -> None:
        self.clock = FakeClock(1_800_000_000.0)
        self.backend = StaticBackend({})
        self.tracking = Tracking(keyring=KEYRING, backend=self.backend, clock=self.clock, **options)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        uid = headers.get(b"cookie", b"uid=alice").decode().partition("=")[2]
        ip = headers.get(b"x-ip")
        await self.tracking.handle(
            scope,
            receive,
            send,
            Identity(customer_id=uid),
            client_ip=ip.decode() if ip is not None else None,
        )

    def token(
        self, age: float, *, b_id: str | None = None, render_id: str = "r1", uid: str = "alice"
    ) -> str:
        """A token of a page view rendered ``age`` seconds ago (its expiry says so)."""
        return encode_token(
            KEYRING,
            Identity(customer_id=uid),
            TrackingToken(
                kind="shown" if b_id is None else "clicked",
                key="hero",
                context=context_for("hero"),
                render_id=render_id,
                expires=self.clock() - age + self.tracking.token_ttl,
                b_id=b_id,
            ),
        )

    async def beacon(
        self, tokens: list[str], *, uid: str = "alice", ip: str | None = None, **headers: str
    ) -> int:
        sent = {"cookie": f"uid={uid}", "user-agent": BROWSER_USER_AGENT, **headers}
        if ip is not None:
            sent["x-ip"] = ip
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            response = await client.post(EVENTS, json={"events": tokens}, headers=sent)
        return response.status_code

    async def sent(self) -> list[str | None]:
        """Each delivered event as its b_id (None for an impression)."""
        await self.tracking.batcher.flush()
        return [a["attributes"].get("b_id") for a in delivered(self.backend)]


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    site = Site()
    await site.tracking.start()
    yield site
    await site.tracking.aclose()


@pytest.mark.anyio
async def test_an_impression_needs_the_dwell_since_render(site: Site) -> None:
    limit = site.tracking.limits.min_impression_age
    assert limit == 0.9
    early = [site.token(age, render_id=f"early{i}") for i, age in enumerate((0.0, 0.5, 0.85))]
    fine = [site.token(age, render_id=f"fine{i}") for i, age in enumerate((0.95, 1.2, 600))]
    assert await site.beacon(early + fine) == 204
    assert site.tracking.stats.rejected_too_soon == 3
    assert site.tracking.stats.accepted == 3
    assert await site.sent() == [None, None, None]


@pytest.mark.anyio
async def test_a_click_needs_a_reaction_time_since_render(site: Site) -> None:
    assert site.tracking.limits.min_click_delay == 0.15
    assert await site.beacon([site.token(0.05, b_id="Add to Cart", render_id="a")]) == 204
    assert await site.beacon([site.token(0.2, b_id="Add to Cart", render_id="b")]) == 204
    assert site.tracking.stats.rejected_too_soon == 1
    assert await site.sent() == ["Add to Cart"]


@pytest.mark.anyio
async def test_clicks_of_one_page_view_at_a_human_rate(site: Site) -> None:
    clicks = [site.token(2.0, b_id=f"button {i}") for i in range(6)]
    assert await site.beacon(clicks) == 204  # six buttons within one instant
    assert site.tracking.stats.accepted == 3 and site.tracking.stats.rejected_rate == 3
    assert await site.beacon([site.token(2.0, b_id="x", render_id="another")]) == 204
    assert site.tracking.stats.accepted == 4  # another page view has its own second
    site.clock.advance(1.0)
    assert await site.beacon(clicks) == 204  # a second later: the refused ones count now
    assert site.tracking.stats.replays == 3 and site.tracking.stats.accepted == 7
    assert sorted(b or "" for b in await site.sent()) == sorted(
        [f"button {i}" for i in range(6)] + ["x"]
    )


@pytest.mark.anyio
async def test_events_per_visitor_and_minute() -> None:
    site = Site(limits=TrackingLimits(visitor_events_per_minute=10, ip_events_per_minute=None))
    tokens = [site.token(5, render_id=f"p{i}") for i in range(15)]
    assert await site.beacon(tokens) == 204
    assert (site.tracking.stats.accepted, site.tracking.stats.rejected_rate) == (10, 5)
    bob = [site.token(5, render_id=f"b{i}", uid="bob") for i in range(3)]
    assert await site.beacon(bob, uid="bob") == 204  # another visitor: his own bucket
    assert site.tracking.stats.accepted == 13
    site.clock.advance(30)  # half a minute refills half the bucket
    assert await site.beacon(tokens) == 204
    assert site.tracking.stats.accepted == 18  # the five refused before, of five allowed
    await site.tracking.aclose()


@pytest.mark.anyio
async def test_events_per_address_and_minute() -> None:
    site = Site(limits=TrackingLimits(visitor_events_per_minute=None, ip_events_per_minute=4))

    def tokens(uid: str) -> list[str]:
        return [site.token(5, render_id=f"{uid}{i}", uid=uid) for i in range(3)]

    # Visitors behind one address share its bucket, an IPv6 /64 counts as one address.
    assert await site.beacon(tokens("a"), uid="a", ip="2001:db8:1:2::10") == 204
    assert await site.beacon(tokens("b"), uid="b", ip="2001:db8:1:2:ffff::1") == 204
    assert site.tracking.stats.accepted == 4
    assert await site.beacon(tokens("c"), uid="c", ip="203.0.113.7") == 204
    assert site.tracking.stats.accepted == 7
    # Without a client_ip the peer address counts (httpx's ASGITransport: 127.0.0.1).
    assert await site.beacon(tokens("d"), uid="d") == 204
    assert await site.beacon(tokens("e"), uid="e") == 204
    assert site.tracking.stats.accepted == 11 and site.tracking.stats.rejected_rate == 4
    await site.tracking.aclose()


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("testclient", "testclient"),
        ("x" * 500, "x" * 128),
        (None, None),
        ("", None),
    ],
)
def test_address_key(given: str | None, key: str | None) -> None:
    assert address_key(given) == key


@pytest.mark.anyio
async def test_a_crawlers_beacon_is_not_even_read() -> None:
    site = Site()
    received: list[Message] = []
    sent: list[Message] = []

    async def receive() -> Message:
        received.append({})
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": EVENTS,
        "headers": [(b"user-agent", GOOGLEBOT_USER_AGENT.encode())],
    }
    await site.tracking.handle(scope, receive, send, Identity(customer_id="alice"))
    assert sent[0]["status"] == 204 and received == []
    assert site.tracking.stats.rejected_bot == 1 and site.tracking.stats.accepted == 0


@pytest.mark.anyio
async def test_bots_track_counts_crawlers_like_people() -> None:
    site = Site(bots="track")
    assert await site.beacon([site.token(5)], **{"user-agent": GOOGLEBOT_USER_AGENT}) == 204
    assert site.tracking.stats.accepted == 1 and site.tracking.stats.rejected_bot == 0
    site.tracking.bots = "ignore"  # and back, on the running instance
    assert await site.beacon([site.token(5, render_id="r2")], **{"user-agent": "curl/8"}) == 204
    assert site.tracking.stats.rejected_bot == 1
    await site.tracking.aclose()


@pytest.mark.anyio
async def test_limits_off_accepts_every_new_verified_event() -> None:
    site = Site()
    site.tracking.limits = TrackingLimits.off()
    tokens = [site.token(0, b_id=f"b{i}") for i in range(20)] + [site.token(0)]
    assert await site.beacon(tokens) == 204
    assert site.tracking.stats.accepted == 21
    await site.tracking.aclose()


def test_limits_are_validated_and_readable() -> None:
    assert TrackingLimits() == TrackingLimits()
    assert TrackingLimits.off() != TrackingLimits()
    assert repr(TrackingLimits()).startswith("TrackingLimits(clicks_per_second=3, ")
    for bad in (
        {"min_impression_age": -1},
        {"min_impression_age": "1"},
        {"min_click_delay": float("nan")},
        {"min_click_delay": float("inf")},
        {"clicks_per_second": 0},
        {"visitor_events_per_minute": 2.5},
        {"ip_events_per_minute": True},
        {"max_keys": None},
    ):
        with pytest.raises(ConfigurationError):
            TrackingLimits(**bad)
    backend = StaticBackend({})
    with pytest.raises(ConfigurationError):
        Tracking(keyring=KEYRING, backend=backend, bots="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Tracking(keyring=KEYRING, backend=backend, limits={"clicks_per_second": 3})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Tracking(keyring=KEYRING, backend=backend, body_timeout=0)
    tracking = Tracking(keyring=KEYRING, backend=backend)
    with pytest.raises(ConfigurationError):
        tracking.bots = "no"  # type: ignore[assignment]


@pytest.mark.anyio
async def test_rate_memory_is_bounded() -> None:
    site = Site(limits=TrackingLimits(max_keys=50))
    for i in range(120):
        token = site.token(5, b_id="Add", render_id=f"r{i}", uid=f"u{i}")
        assert await site.beacon([token], uid=f"u{i}", ip=f"198.51.100.{i}") == 204
    guard = site.tracking._guard
    assert len(guard._visitors) <= 50 and len(guard._addresses) <= 50
    assert len(guard._clicks) <= 50
    assert site.tracking.stats.accepted == 120
    await site.tracking.aclose()


# == 3. slow bodies, over real sockets ==========================================================

BEACON_HEAD = (
    b"POST /_personalize/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"User-Agent: " + BROWSER_USER_AGENT.encode() + b"\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
)


@pytest.fixture
def slow_site() -> Iterator[tuple[str, int, Tracking]]:
    backend = experiences()
    tracking = Tracking(keyring=KEYRING, backend=backend, body_timeout=3.0)
    with run_asgi_server(shop(backend, tracking), lifespan="on") as base:
        yield base, int(base.rsplit(":", 1)[1]), tracking


def answer_times(socks: dict[socket.socket, float], limit: float) -> dict[socket.socket, Any]:
    """Trickle one byte a second into every socket until its server answers and closes
    it; returns, per socket, (seconds from its request to its answer, status line,
    closed by the server)."""
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytes] = {}
    answered: dict[socket.socket, Any] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
    deadline = time.monotonic() + limit
    next_trickle = time.monotonic()
    closed = 0
    while closed < len(socks) and time.monotonic() < deadline:
        if time.monotonic() >= next_trickle:  # the attack: one byte a second per socket
            for sock in socks:
                if sock not in answered:
                    with contextlib.suppress(OSError):  # closed by the server: read below
                        sock.send(b" ")
            next_trickle += 1.0
        for key, _ in selector.select(timeout=0.05):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            try:
                chunk = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if sock not in answered and chunk:
                answered[sock] = [time.monotonic() - socks[sock], None, False]
            buffers[sock] += chunk
            if not chunk:  # EOF: the server let the connection go
                selector.unregister(sock)
                closed += 1
                if sock not in answered:
                    answered[sock] = [time.monotonic() - socks[sock], None, True]
                answered[sock][1] = buffers[sock].split(b"\r\n", 1)[0]
                answered[sock][2] = True
    selector.close()
    return answered


def test_a_body_trickled_a_byte_at_a_time_gets_408_within_the_bound(
    slow_site: tuple[str, int, Tracking],
) -> None:
    _base, port, tracking = slow_site
    sock = socket.create_connection(("127.0.0.1", port))
    with sock:
        sock.sendall(BEACON_HEAD)
        result = answer_times({sock: time.monotonic()}, limit=10)
    (after, status, closed) = result[sock]
    assert status == b"HTTP/1.1 408 Request Timeout" and closed
    assert 3.0 <= after < 3.0 + 1.0
    assert tracking.stats.rejected_slow == 1


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"User-Agent: " + GOOGLEBOT_USER_AGENT.encode(), b"HTTP/1.1 204 No Content"),
        (b"Origin: https://evil.example", b"HTTP/1.1 403 Forbidden"),
        (b"Content-Length: 99999999", b"HTTP/1.1 413 Request Entity Too Large"),
    ],
)
def test_a_body_answered_before_it_is_read_does_not_hold_the_connection(
    slow_site: tuple[str, int, Tracking], header: bytes, status: bytes
) -> None:
    """Refused unread (a crawler's, cross-site, declared too large) while the body still
    trickles in: the answer says Connection: close and the server lets the socket go at
    once instead of waiting for the rest of the body."""
    _base, port, _tracking = slow_site
    name = header.split(b":", 1)[0]
    lines = [line for line in BEACON_HEAD.split(b"\r\n") if not line.startswith(name + b":")]
    head = b"\r\n".join([lines[0], header, *lines[1:]])
    sock = socket.create_connection(("127.0.0.1", port))
    with sock:
        sock.sendall(head)
        result = answer_times({sock: time.monotonic()}, limit=10)
    (after, answer, closed) = result[sock]
    assert answer == status and closed
    assert after < 1.0  # not the 3 s body timeout: answered and let go right away


def test_200_slow_bodies_are_all_let_go_and_pages_stay_fast(
    slow_site: tuple[str, int, Tracking], capsys: pytest.CaptureFixture[str]
) -> None:
    base, port, tracking = slow_site
    with httpx.Client(base_url=base) as client:

        def page_times(count: int) -> list[float]:
            times = []
            for _ in range(count):
                started = time.monotonic()
                assert client.get("/").status_code == 200
                times.append(time.monotonic() - started)
            return times

        quiet = page_times(30)
        socks: dict[socket.socket, float] = {}
        try:
            for _ in range(200):
                # The clock is read before sending: the server's timer cannot start sooner.
                sent = time.monotonic()
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(BEACON_HEAD)
                socks[sock] = sent
            held_from = max(socks.values())
            busy = page_times(30)
            # Still within the body timeout: every slow body is being held right now.
            assert time.monotonic() - min(socks.values()) < tracking.body_timeout
            answered = answer_times(socks, limit=tracking.body_timeout + 10)
        finally:
            for sock in socks:
                sock.close()
        after = page_times(10)
    assert len(answered) == 200
    assert {status for _, status, _ in answered.values()} == {b"HTTP/1.1 408 Request Timeout"}
    assert all(closed for _, _, closed in answered.values())
    waits = sorted(seconds for seconds, _, _ in answered.values())
    # uvloop's timers (libuv) count whole milliseconds from a time cached per loop
    # iteration: one may fire up to ~1 ms before the exact monotonic deadline.
    assert waits[0] >= tracking.body_timeout - 0.002
    assert waits[-1] < tracking.body_timeout + 1.5
    assert tracking.stats.rejected_slow == 200
    with capsys.disabled():
        print(
            f"\n200 slow bodies: opened in {held_from - min(socks.values()):.2f} s, 408 after "
            f"{statistics.median(waits):.2f} s median ({waits[0]:.2f}-{waits[-1]:.2f}); "
            f"page ms quiet {_ms(quiet)} / 200 held {_ms(busy)} / after {_ms(after)}"
        )
    assert statistics.median(busy) < max(0.1, 5 * statistics.median(quiet))


def _ms(times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    return f"median {statistics.median(ordered) * 1000:.1f} p95 {p95 * 1000:.1f}"


def test_a_beacon_sent_at_once_is_not_slow(slow_site: tuple[str, int, Tracking]) -> None:
    base, _port, tracking = slow_site
    body = json.dumps({"events": ["not-a-token"]}).encode()
    with httpx.Client(base_url=base, headers={"user-agent": BROWSER_USER_AGENT}) as client:
        assert client.post(EVENTS, content=body).status_code == 403
    assert tracking.stats.rejected_slow == 0
