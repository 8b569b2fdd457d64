"""Circuit breaker and upstream pauses (401, 429 Retry-After)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from .._exceptions import APIError, AuthenticationError, CircuitOpenError
from .._interfaces import Telemetry
from .._logging import RateLimitedLog
from .._retry import DEFAULT_RETRY_POLICY, RetryPolicy

__all__ = [
    "DEFAULT_BREAKER_COOLDOWN",
    "DEFAULT_BREAKER_THRESHOLD",
    "CircuitBreaker",
]

logger = logging.getLogger("personalize_middleware.breaker")

DEFAULT_BREAKER_THRESHOLD = 5
DEFAULT_BREAKER_COOLDOWN = 10.0


class CircuitBreaker:
    """closed -> (threshold consecutive failures) -> open for ``cooldown`` -> half-open:
    one probe call; its success closes the circuit, its failure reopens it.

    Independently, the ``RetryPolicy`` pauses calls: a 401 for ``auth_pause`` (a wrong
    or rotated secret must not be hammered), a 429 for its ``Retry-After`` (capped).
    ``auth_pause`` here is a shortcut for ``policy=RetryPolicy(auth_pause=...)``.
    """

    def __init__(
        self,
        *,
        threshold: int = DEFAULT_BREAKER_THRESHOLD,
        cooldown: float = DEFAULT_BREAKER_COOLDOWN,
        policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        auth_pause: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        if auth_pause is not None:
            policy = dataclasses.replace(policy, auth_pause=auth_pause)
        self.policy = policy
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probe_in_flight = False
        self.paused_until = 0.0
        self.times_opened = 0
        self._log = RateLimitedLog(logger)
        #: Told of every state change (``PersonalizeMiddleware(telemetry=...)``).
        self.telemetry: Telemetry | None = None

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
            if self.telemetry is not None:
                self.telemetry.breaker_changed("half-open")

    def record_success(self) -> None:
        if self.opened_at is not None:
            logger.info("personalize: upstream recovered; circuit closed")
            if self.telemetry is not None:
                self.telemetry.breaker_changed("closed")
        self.failures = 0
        self.opened_at = None
        self.probe_in_flight = False

    def record_failure(self, exc: APIError) -> None:
        pause = self.policy.pause_for(exc)
        if pause is not None:
            self.pause(pause)
        if isinstance(exc, AuthenticationError):
            self._log.error(
                "auth",
                "personalize: MoEngage rejected the credentials (401). Check "
                "MOENGAGE_WORKSPACE_ID / MOENGAGE_API_SECRET (a regenerated secret fails at "
                "once). Fetching paused for %.0fs; pages render defaults.",
                self.policy.auth_pause,
            )
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
            if self.telemetry is not None:
                self.telemetry.breaker_changed("open")
        self.probe_in_flight = False
