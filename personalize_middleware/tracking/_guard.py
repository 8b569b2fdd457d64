"""Human-rate rules for verified events: ``TrackingLimits`` (the settings) and
``EventGuard`` (their state).

A verified token proves the event belongs to a page view we rendered for this visitor,
not that a person saw or clicked anything: a script can fetch pages and POST every token
it finds. What a person cannot do:

- report an impression sooner than the tracking script's dwell (the element >=50%
  visible for 1 continuous second) after the page was rendered. The token carries
  ``expires = render time + token_ttl`` (milliseconds), so the render time is known;
- click sooner than a reaction time after the page was rendered, or click many
  elements of one page within a second;
- produce more than a person's worth of events a minute, per visitor and per address.

Too-early events are remembered as seen (a later replay of the same token is a replay,
not a second chance); events over a rate are dropped and counted. Everything is per
process and bounded (``max_keys`` visitors, addresses and page views remembered each).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from cachetools import TTLCache

from .._exceptions import ConfigurationError
from ._tokens import TrackingToken

__all__ = [
    "DEFAULT_CLICKS_PER_SECOND",
    "DEFAULT_IP_EVENTS_PER_MINUTE",
    "DEFAULT_MIN_CLICK_DELAY",
    "DEFAULT_MIN_IMPRESSION_AGE",
    "DEFAULT_RATE_KEYS",
    "DEFAULT_VISITOR_EVENTS_PER_MINUTE",
    "EventGuard",
    "TrackingLimits",
    "address_key",
]

#: The script's dwell is 1 s after the element became visible, which is after the page
#: reached the browser: 0.1 s of slack for clocks and timer granularity.
DEFAULT_MIN_IMPRESSION_AGE = 0.9
#: The fastest human reaction to a painted page is ~0.15-0.2 s, and painting comes after
#: the page left the server (a click 0.2 s after *load* is comfortably accepted).
DEFAULT_MIN_CLICK_DELAY = 0.15
#: Distinct tracked elements of one page view clicked within any one second.
DEFAULT_CLICKS_PER_SECOND = 3
#: A fast reader: ~10 pages a minute with a few experiences and a click or two each.
DEFAULT_VISITOR_EVENTS_PER_MINUTE = 120
#: Several such readers behind one NAT; raise it for large shared (CGNAT) addresses.
DEFAULT_IP_EVENTS_PER_MINUTE = 600
DEFAULT_RATE_KEYS = 50_000

_MAX_KEY_CHARS = 128


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigurationError(f"{name} must be a number >= 0", field=name)
    if value == float("inf"):
        raise ConfigurationError(f"{name} must be finite", field=name)
    return float(value)


def _rate(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer or None", field=name)
    return value


class TrackingLimits:
    """What a person can do, per process; events beyond are dropped and counted.

    ``min_impression_age`` / ``min_click_delay``: seconds after the page was rendered
    before an impression / a click can be real. ``clicks_per_second``: distinct elements
    of one page view clicked within any second. ``visitor_events_per_minute`` /
    ``ip_events_per_minute``: accepted events a minute per visitor / per client address
    (IPv6 by /64), a token bucket of that size refilled over a minute. ``None`` turns a
    rate off; ``TrackingLimits.off()`` turns everything off (tests, benchmarks).
    ``max_keys``: visitors, addresses and page views remembered (each; oldest forgotten).
    """

    __slots__ = (
        "clicks_per_second",
        "ip_events_per_minute",
        "max_keys",
        "min_click_delay",
        "min_impression_age",
        "visitor_events_per_minute",
    )

    def __init__(
        self,
        *,
        min_impression_age: float = DEFAULT_MIN_IMPRESSION_AGE,
        min_click_delay: float = DEFAULT_MIN_CLICK_DELAY,
        clicks_per_second: int | None = DEFAULT_CLICKS_PER_SECOND,
        visitor_events_per_minute: int | None = DEFAULT_VISITOR_EVENTS_PER_MINUTE,
        ip_events_per_minute: int | None = DEFAULT_IP_EVENTS_PER_MINUTE,
        max_keys: int = DEFAULT_RATE_KEYS,
    ) -> None:
        self.min_impression_age = _non_negative("min_impression_age", min_impression_age)
        self.min_click_delay = _non_negative("min_click_delay", min_click_delay)
        self.clicks_per_second = _rate("clicks_per_second", clicks_per_second)
        self.visitor_events_per_minute = _rate(
            "visitor_events_per_minute", visitor_events_per_minute
        )
        self.ip_events_per_minute = _rate("ip_events_per_minute", ip_events_per_minute)
        max_keys_checked = _rate("max_keys", max_keys)
        if max_keys_checked is None:
            raise ConfigurationError("max_keys must be a positive integer", field="max_keys")
        self.max_keys = max_keys_checked

    @classmethod
    def off(cls) -> TrackingLimits:
        """No timing rule and no rate: every verified, new event is accepted."""
        return cls(
            min_impression_age=0,
            min_click_delay=0,
            clicks_per_second=None,
            visitor_events_per_minute=None,
            ip_events_per_minute=None,
        )

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrackingLimits):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"TrackingLimits({args})"


class EventGuard:
    """The state behind ``TrackingLimits``: token buckets per visitor and per address,
    recent clicks per page view. Bounded TTL caches; ``now`` is the tracking clock's
    (Unix) time, so it can be compared with a token's render time."""

    def __init__(
        self, limits: TrackingLimits, *, token_ttl: float, clock: Callable[[], float]
    ) -> None:
        self.token_ttl = token_ttl
        self._clock = clock
        self.limits = limits

    @property
    def limits(self) -> TrackingLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: TrackingLimits) -> None:
        self._limits = limits
        size = limits.max_keys
        # An idle minute refills a bucket: forgetting it then loses nothing.
        self._visitors: TTLCache[str, list[float]] = TTLCache(size, 60.0, timer=self._clock)
        self._addresses: TTLCache[str, list[float]] = TTLCache(size, 60.0, timer=self._clock)
        self._clicks: TTLCache[str, list[float]] = TTLCache(size, 1.0, timer=self._clock)

    def rendered_at(self, event: TrackingToken) -> float:
        """When the event's page was rendered (from the token's expiry)."""
        return event.expires - self.token_ttl

    def too_soon(self, event: TrackingToken, now: float) -> bool:
        """Sooner after the page's render than a person can see or click it."""
        limits = self._limits
        minimum = limits.min_impression_age if event.kind == "shown" else limits.min_click_delay
        return minimum > 0 and now - self.rendered_at(event) < minimum

    def admit(self, visitor: str, address: str | None, event: TrackingToken, now: float) -> bool:
        """Take one event from the rates (all or none): ``False`` when one is spent."""
        limits = self._limits
        buckets: list[tuple[TTLCache[str, list[float]], str, int]] = []
        if limits.visitor_events_per_minute is not None:
            buckets.append((self._visitors, visitor, limits.visitor_events_per_minute))
        if limits.ip_events_per_minute is not None and address is not None:
            buckets.append((self._addresses, address, limits.ip_events_per_minute))
        clicks: list[float] | None = None
        if event.kind == "clicked" and limits.clicks_per_second is not None:
            clicks = [t for t in self._clicks.get(event.render_id, ()) if now - t < 1.0]
            if len(clicks) >= limits.clicks_per_second:
                return False
        levels = []
        for cache, key, per_minute in buckets:
            level, last = cache.get(key) or (float(per_minute), now)
            level = min(float(per_minute), level + max(0.0, now - last) * per_minute / 60.0)
            if level < 1.0:
                return False
            levels.append(level)
        for (cache, key, _), level in zip(buckets, levels, strict=True):
            cache[key] = [level - 1.0, now]
        if clicks is not None:
            clicks.append(now)
            self._clicks[event.render_id] = clicks
        return True


def address_key(client_ip: str | None) -> str | None:
    """What the per-address rate counts by: an IPv4 address, an IPv6 /64 (one host
    usually has the whole /64), or the text as given (bounded) when it is no address."""
    if not client_ip:
        return None
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip[:_MAX_KEY_CHARS]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
