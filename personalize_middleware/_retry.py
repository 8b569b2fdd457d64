"""The one retry / pause policy: Retry-After, backoff, 401 and 429 pauses.

Used by the HTTP client (reading ``Retry-After``), the circuit breaker (pausing fetches),
the Redis layer (publishing a 429 pause to every process) and the event batcher (backing
off between delivery attempts). One value per default, here.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC

from ._config import positive_number
from ._exceptions import AuthenticationError, RateLimitedError

__all__ = [
    "DEFAULT_AUTH_PAUSE",
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_RATE_LIMIT_PAUSE",
    "DEFAULT_RETRY_POLICY",
    "MAX_RETRY_AFTER",
    "RetryPolicy",
    "parse_retry_after",
]

#: A 401 pauses calls this long: a wrong or rotated secret must not be hammered.
DEFAULT_AUTH_PAUSE = 60.0
#: A 429 without a (readable) Retry-After pauses calls this long.
DEFAULT_RATE_LIMIT_PAUSE = 1.0
#: A Retry-After beyond this is clamped: a bogus "retry in a day" must not park the app.
MAX_RETRY_AFTER = 300.0
#: Exponential backoff with jitter between retries: first ceiling, and the cap.
DEFAULT_BACKOFF_INITIAL = 0.5
DEFAULT_BACKOFF_MAX = 30.0


def parse_retry_after(
    value: str | None, *, now: float | None = None, limit: float = MAX_RETRY_AFTER
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP-date).

    ``None`` when absent or unreadable; clamped to ``0..limit``.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one means the same
            when = when.replace(tzinfo=UTC)
        current = time.time() if now is None else now
        seconds = when.timestamp() - current
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), limit)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How long to wait after a failed upstream call.

    ``pause_for(exc)`` is what *every* caller must respect before the next call (a 401's
    ``auth_pause``, a 429's Retry-After clamped to ``max_retry_after``); ``backoff(n, exc)``
    adds exponential backoff with jitter for the n-th retry of the same work, never less
    than that pause.
    """

    auth_pause: float = DEFAULT_AUTH_PAUSE
    rate_limit_pause: float = DEFAULT_RATE_LIMIT_PAUSE
    max_retry_after: float = MAX_RETRY_AFTER
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL
    backoff_max: float = DEFAULT_BACKOFF_MAX

    def __post_init__(self) -> None:
        for name in (
            "auth_pause",
            "rate_limit_pause",
            "max_retry_after",
            "backoff_initial",
            "backoff_max",
        ):
            positive_number(name, getattr(self, name))

    def clamp(self, seconds: float) -> float:
        """``seconds`` bounded to ``0..max_retry_after``."""
        return min(max(seconds, 0.0), self.max_retry_after)

    def pause_for(self, exc: BaseException) -> float | None:
        """The pause a failure imposes on every caller, or ``None`` for none."""
        if isinstance(exc, AuthenticationError):
            return self.auth_pause
        if isinstance(exc, RateLimitedError):
            wait = exc.retry_after if exc.retry_after is not None else self.rate_limit_pause
            return self.clamp(wait)
        return None

    def backoff(
        self,
        attempt: int,
        exc: BaseException | None = None,
        *,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> float:
        """Seconds before retry number ``attempt`` (1-based): a random delay in the upper
        half of ``min(backoff_max, backoff_initial * 2**(attempt-1))``, at least the pause
        ``exc`` imposes."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** max(attempt - 1, 0))
        delay = rand(ceiling / 2, ceiling)
        pause = None if exc is None else self.pause_for(exc)
        return delay if pause is None else max(delay, pause)


DEFAULT_RETRY_POLICY = RetryPolicy()
