"""Why each experience of a request is what it is: the ``Decision``.

Every key a request asks for ends in one decision, kept per request on the
``Personalization`` handle (``handle.why(key)``, ``handle.decisions``), never on the
``Experience``: the store shares one ``Experience`` object between every user who got
the same answer, so it cannot carry one request's story.

``source`` says where the answer came from:

    network   fetched from MoEngage for this request (or a fetch in flight it joined)
    local     evaluated by the embedded local engine (local mode)
    shared    from the shared cache (L2, Redis), fresh
    cache     from this process's cache (L1), fresh
    stale     an older answer standing in: ``reason`` says why (``revalidating``: the
              stale-while-revalidate window, a refresh runs; else the failure it covers)
    default   nothing to show: the template's default renders; ``reason`` says why
    pending   still being fetched (the latency budget has not run out yet)

``reason`` (``None`` for a plain answer):

    timeout         the latency budget ran out first
    breaker_open    the circuit breaker is open (or calls are paused after 401 / 429)
    rate_limited    the workspace's rate budget is spent (429 or the shared limiter)
    shed            too many fetches in flight: answered without a call
    upstream_error  the call failed (5xx, connection, malformed answer, upstream timeout)
    not_active      the experience is Paused or Scheduled (metadata)
    unknown_key     the workspace has no experience with this key (metadata)
    no_match        MoEngage answered: this user is in no audience of the experience
    revalidating    stale content served while a refresh runs
    preview         an answer for the customer or audience of a preview link
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ._exceptions import CircuitOpenError, RateLimitedError
from ._models import CachedExperience, Experience

__all__ = [
    "BREAKER_OPEN",
    "CACHE",
    "DEFAULT",
    "LOCAL",
    "NETWORK",
    "NOT_ACTIVE",
    "NO_MATCH",
    "PENDING",
    "PREVIEW",
    "RATE_LIMITED",
    "REASONS",
    "REVALIDATING",
    "SHARED",
    "SHED",
    "SOURCES",
    "STALE",
    "TIMEOUT",
    "UNKNOWN_KEY",
    "UPSTREAM_ERROR",
    "DecidedFuture",
    "Decision",
    "decision_from_entry",
    "reason_for_error",
    "settle",
]

NETWORK = "network"
LOCAL = "local"
SHARED = "shared"
CACHE = "cache"
STALE = "stale"
DEFAULT = "default"
PENDING = "pending"
SOURCES: tuple[str, ...] = (NETWORK, LOCAL, SHARED, CACHE, STALE, DEFAULT, PENDING)

TIMEOUT = "timeout"
BREAKER_OPEN = "breaker_open"
RATE_LIMITED = "rate_limited"
SHED = "shed"
UPSTREAM_ERROR = "upstream_error"
NOT_ACTIVE = "not_active"
UNKNOWN_KEY = "unknown_key"
NO_MATCH = "no_match"
REVALIDATING = "revalidating"
PREVIEW = "preview"
REASONS: tuple[str, ...] = (
    TIMEOUT,
    BREAKER_OPEN,
    RATE_LIMITED,
    SHED,
    UPSTREAM_ERROR,
    NOT_ACTIVE,
    UNKNOWN_KEY,
    NO_MATCH,
    REVALIDATING,
    PREVIEW,
)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request's answer for one key came from, and why.

    ``source`` and ``reason``: see the module docstring. ``age``: seconds since the
    answer was fetched (cached and stale answers, and defaults standing for a cached "no
    match"). ``fetch_ms``: how long the upstream fetch that produced it took. ``str()``
    reads well in a template: ``cache (12 s old)``, ``default: timeout``.
    """

    source: str
    reason: str | None = None
    age: float | None = None
    fetch_ms: float | None = None

    @property
    def is_default(self) -> bool:
        """True when the template's default renders for this key."""
        return self.source == DEFAULT or self.source == PENDING

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (ages in seconds and fetch times in ms, rounded)."""
        return {
            "source": self.source,
            "reason": self.reason,
            "age": None if self.age is None else round(self.age, 1),
            "fetch_ms": None if self.fetch_ms is None else round(self.fetch_ms, 1),
        }

    def __str__(self) -> str:
        text = self.source if self.reason is None else f"{self.source}: {self.reason}"
        if self.age is not None and self.age >= 0.05:
            text += f" ({self.age:.0f} s old)" if self.age >= 1 else f" ({self.age:.1f} s old)"
        if self.fetch_ms is not None:
            text += f" [fetch {self.fetch_ms:.0f} ms]"
        return text


def reason_for_error(exc: BaseException) -> str:
    """The reason a failed fetch gives the stale content or defaults standing in."""
    if isinstance(exc, CircuitOpenError):
        return BREAKER_OPEN
    if isinstance(exc, RateLimitedError):
        return RATE_LIMITED
    return UPSTREAM_ERROR


def decision_from_entry(
    entry: CachedExperience,
    source: str,
    reason: str | None,
    now: float,
    fetch_ms: float | None = None,
) -> Decision:
    """The decision for an answer read from ``entry`` at ``now`` (a cached "no match"
    is a default with reason ``no_match``, whatever the source)."""
    age = max(0.0, now - entry.fetched_at)
    if entry.experience is None:
        return Decision(DEFAULT, NO_MATCH, age, fetch_ms)
    return Decision(source, reason, age, fetch_ms)


class DecidedFuture(asyncio.Future["Experience | None"]):
    """A store future that, once done, carries the ``Decision`` behind its result (the
    same for every request that joined it)."""

    __slots__ = ("decision",)

    decision: Decision


def settle(
    future: asyncio.Future[Experience | None],
    entry: CachedExperience | None,
    *,
    source: str,
    reason: str | None,
    now: float,
    fetch_ms: float | None = None,
) -> None:
    """Resolve ``future`` with ``entry``'s experience (``None``: the default renders) and
    record why on it. A future already done is left alone."""
    if future.done():
        return
    if entry is None:
        decision = Decision(DEFAULT, reason or UPSTREAM_ERROR, None, fetch_ms)
    else:
        decision = decision_from_entry(entry, source, reason, now, fetch_ms)
    if isinstance(future, DecidedFuture):
        future.decision = decision
    future.set_result(None if entry is None else entry.experience)
