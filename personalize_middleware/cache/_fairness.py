"""Per-client limits on cache-miss fetches, so one client cannot spend the workspace's budget.

Every fetch the store would start (a miss, or a stale-while-revalidate refresh) first takes
a token from two buckets: the client's address and the identity's. A client that ran out
gets stale content or the defaults at once, without an upstream call (``StoreStats.
client_limited``); other clients have buckets of their own and never notice. Cache hits
and joins to a fetch already in flight cost nothing.

- **Address** (``per_ip``): what bounds a flood of cookieless requests, each of which mints
  a new visitor id and so a new identity. IPv6 addresses count per ``/64`` (one
  subscriber's usual allocation: a host picks a new address in it at will); IPv4-mapped
  IPv6 addresses count as the IPv4 address.
- **Identity** (``per_identity``): what bounds one visitor (or one account, from many
  addresses) cycling attacker-chosen attributes (a random ``utm_source`` or User-Agent on
  every request), each of which is a new cache context.

A token bucket per key: ``burst`` tokens, refilled at ``per_*`` tokens a minute. Buckets
live in a bounded ``cachetools.TTLCache`` and expire once they would be full again, so a
forgotten bucket and a full one are the same; an evicted client only gets a fresh burst.
O(1) per fetch. The limits are per process: with N processes a client may start up to N
times as many fetches (docs/fair-budget.md).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from .._config import positive_int, positive_number
from .._exceptions import ConfigurationError

__all__ = [
    "DEFAULT_CLIENT_LIMITS",
    "DEFAULT_IDENTITY_BURST",
    "DEFAULT_IP_BURST",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_PER_IDENTITY",
    "DEFAULT_PER_IP",
    "ClientKey",
    "ClientLimiter",
    "ClientLimits",
    "address_bucket",
]

#: Cache-miss fetches a minute per client address, per process. 1.3 % of the default
#: workspace budget (9,000 a minute): one address cannot starve the others, while a
#: corporate NAT still gets 2 new visitors' first pages a second on every process.
DEFAULT_PER_IP = 120.0
#: Fetches an address may start at once before the rate applies (well under the default
#: 100 fetches in flight, so a burst cannot take every slot).
DEFAULT_IP_BURST = 30
#: Fetches a minute per identity: a reader's first pages of each kind, the contexts a
#: campaign link adds and the refreshes of what they read need a few a minute at most.
DEFAULT_PER_IDENTITY = 60.0
DEFAULT_IDENTITY_BURST = 20
#: Buckets kept per kind (addresses, identities), about 300 bytes each with the key: at
#: most ~12 MB. A bucket lives 15-20 s after its last fetch (until it would be full), so
#: this holds every client of a process starting 1,000 fetches a second, 10x the default
#: in-flight cap at 100 ms an answer.
DEFAULT_MAX_CLIENTS = 20_000
DEFAULT_IPV6_PREFIX = 64

#: How the store learns the requesting address: called only when a fetch is about to
#: start, so a cache hit never pays for working it out. ``None``: unknown.
ClientKey = Callable[[], str | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientLimits:
    """Limits on the cache-miss fetches each client may start (rates are per minute; a
    limit of ``None`` turns that bucket off). Pass ``client_limits=None`` to the
    middleware to turn both off."""

    per_ip: float | None = DEFAULT_PER_IP
    ip_burst: int = DEFAULT_IP_BURST
    per_identity: float | None = DEFAULT_PER_IDENTITY
    identity_burst: int = DEFAULT_IDENTITY_BURST
    max_clients: int = DEFAULT_MAX_CLIENTS
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX

    def __post_init__(self) -> None:
        for name in ("per_ip", "per_identity"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, positive_number(name, value))
        positive_int("ip_burst", self.ip_burst)
        positive_int("identity_burst", self.identity_burst)
        positive_int("max_clients", self.max_clients)
        if positive_int("ipv6_prefix", self.ipv6_prefix) > 128:
            raise ConfigurationError("ipv6_prefix must be 1..128", field="ipv6_prefix")


#: The middleware's default (``client_limits=``).
DEFAULT_CLIENT_LIMITS = ClientLimits()


class _Buckets:
    """Token buckets by key: ``burst`` tokens, ``per_minute`` back a minute."""

    __slots__ = ("_entries", "burst", "rate")

    def __init__(
        self, per_minute: float, burst: int, maxsize: int, timer: Callable[[], float]
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        # Full again after burst / rate seconds: then forgetting the bucket loses nothing.
        ttl = self.burst / self.rate
        self._entries: TTLCache[str, tuple[float, float]] = TTLCache(maxsize, ttl, timer=timer)

    def available(self, key: str, now: float) -> float:
        entry = self._entries.get(key)
        if entry is None:
            return self.burst
        tokens, stamp = entry
        return min(self.burst, tokens + (now - stamp) * self.rate)

    def take(self, key: str, available: float, now: float) -> None:
        self._entries[key] = (available - 1.0, now)  # set again: renews the expiry

    def __len__(self) -> int:
        return len(self._entries)


class ClientLimiter:
    """Decides whether a client may start one more upstream fetch (``allow``)."""

    __slots__ = ("_identities", "_ips", "clock", "limits")

    def __init__(
        self, limits: ClientLimits, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.clock = clock
        self._ips = (
            _Buckets(limits.per_ip, limits.ip_burst, limits.max_clients, clock)
            if limits.per_ip is not None
            else None
        )
        self._identities = (
            _Buckets(limits.per_identity, limits.identity_burst, limits.max_clients, clock)
            if limits.per_identity is not None
            else None
        )

    def allow(self, client: ClientKey | None, identity: str) -> bool:
        """Take a token from the client's address and from ``identity``, or from neither
        when either is spent. An unknown address is limited by its identity only."""
        now = self.clock()
        ips, ip_key, ip_tokens = self._ips, None, 0.0
        if ips is not None and client is not None:
            address = client()
            if address:
                ip_key = address_bucket(address, self.limits.ipv6_prefix)
                ip_tokens = ips.available(ip_key, now)
                if ip_tokens < 1.0:
                    return False  # before the identity: a flood leaves no bucket behind
        identities = self._identities
        if identities is not None:
            id_tokens = identities.available(identity, now)
            if id_tokens < 1.0:
                return False
            identities.take(identity, id_tokens, now)
        if ips is not None and ip_key is not None:
            ips.take(ip_key, ip_tokens, now)
        return True

    @property
    def tracked(self) -> tuple[int, int]:
        """(addresses, identities) with a bucket now: bounded by ``max_clients`` each."""
        return (_size(self._ips), _size(self._identities))


def _size(buckets: _Buckets | None) -> int:
    return len(buckets) if buckets is not None else 0


def address_bucket(address: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The bucket an address counts in: itself for IPv4, its ``/ipv6_prefix`` for IPv6."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
