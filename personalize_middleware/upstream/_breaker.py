"""Circuit breaker and upstream pauses (401, 429 Retry-After)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .._exceptions import (
    APIError,
    AuthenticationError,
    RateLimitedError,
    UpstreamUnavailableError,
)
from .._logging import RateLimitedLog

__all__ = [
    "DEFAULT_AUTH_PAUSE",
    "DEFAULT_BREAKER_COOLDOWN",
    "DEFAULT_BREAKER_THRESHOLD",
    "DEFAULT_MAX_RETRY_AFTER",
    "CircuitBreaker",
    "CircuitOpenError",
]

logger = logging.getLogger("personalize_middleware.breaker")

DEFAULT_BREAKER_THRESHOLD = 5
DEFAULT_BREAKER_COOLDOWN = 10.0
DEFAULT_AUTH_PAUSE = 30.0
DEFAULT_MAX_RETRY_AFTER = 60.0
DEFAULT_RATE_LIMIT_PAUSE = 1.0


class CircuitOpenError(UpstreamUnavailableError):
    """No call was made: the breaker is open or fetching is paused."""


class CircuitBreaker:
    """closed -> (threshold consecutive failures) -> open for ``cooldown`` -> half-open:
    one probe call; its success closes the circuit, its failure reopens it.

    Independently, a 401 pauses calls for ``auth_pause`` (a wrong or rotated secret must
    not be hammered) and a 429 pauses them for its ``Retry-After`` (capped).
    """

    def __init__(
        self,
        *,
        threshold: int = DEFAULT_BREAKER_THRESHOLD,
        cooldown: float = DEFAULT_BREAKER_COOLDOWN,
        auth_pause: float = DEFAULT_AUTH_PAUSE,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.auth_pause = auth_pause
        self.max_retry_after = max_retry_after
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probe_in_flight = False
        self.paused_until = 0.0
        self.times_opened = 0
        self._log = RateLimitedLog(logger)

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at < self.cooldown:
            return "open"
        return "half-open"

    def pause(self, seconds: float) -> None:
        """Make no calls for ``seconds`` (e.g. a Retry-After seen by another process)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    def before_call(self) -> None:
        """Raise ``CircuitOpenError`` when no call may be made now."""
        now = self.clock()
        if now < self.paused_until:
            raise CircuitOpenError(f"fetching paused for {self.paused_until - now:.1f}s more")
        state = self.state
        if state == "open":
            raise CircuitOpenError("circuit open after repeated upstream failures")
        if state == "half-open":
            if self.probe_in_flight:
                raise CircuitOpenError("circuit half-open; a probe call is in flight")
            self.probe_in_flight = True

    def record_success(self) -> None:
        if self.opened_at is not None:
            logger.info("personalize: upstream recovered; circuit closed")
        self.failures = 0
        self.opened_at = None
        self.probe_in_flight = False

    def record_failure(self, exc: APIError) -> None:
        if isinstance(exc, AuthenticationError):
            self.pause(self.auth_pause)
            self._log.error(
                "auth",
                "personalize: MoEngage rejected the credentials (401). Check "
                "MOENGAGE_WORKSPACE_ID / MOENGAGE_API_SECRET (a regenerated secret fails at "
                "once). Fetching paused for %.0fs; pages render defaults.",
                self.auth_pause,
            )
        elif isinstance(exc, RateLimitedError):
            wait = exc.retry_after if exc.retry_after is not None else DEFAULT_RATE_LIMIT_PAUSE
            self.pause(min(max(wait, 0.0), self.max_retry_after))
        if not exc.retryable and not isinstance(exc, AuthenticationError):
            # A 400 is about the request, not the upstream's health.
            self.probe_in_flight = False
            return
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            if self.opened_at is None:
                self.times_opened += 1
                self._log.warning(
                    "open",
                    "personalize: %d consecutive upstream failures; circuit open for %.0fs",
                    self.failures,
                    self.cooldown,
                )
            self.opened_at = self.clock()
        self.probe_in_flight = False
