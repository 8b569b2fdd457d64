"""Naming what went wrong, the same way for every telemetry: bounded label values."""

from __future__ import annotations

import asyncio

from .._exceptions import (
    AuthenticationError,
    BadRequestError,
    CircuitOpenError,
    ConfigurationError,
    MalformedResponseError,
    RateLimitedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)

__all__ = ["call_outcome", "denial_reason", "missing_extra", "short_endpoint"]


def call_outcome(error: BaseException | None) -> str:
    """``ok``, ``timeout``, ``unavailable``, ``rate_limited``, ``unauthorized``,
    ``bad_request``, ``malformed``, ``cancelled`` or ``error``."""
    if error is None:
        return "ok"
    if isinstance(error, UpstreamTimeoutError):
        return "timeout"
    if isinstance(error, UpstreamUnavailableError):
        return "unavailable"
    if isinstance(error, RateLimitedError):
        return "rate_limited"
    if isinstance(error, AuthenticationError):
        return "unauthorized"
    if isinstance(error, BadRequestError):
        return "bad_request"
    if isinstance(error, MalformedResponseError):
        return "malformed"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return "error"


def denial_reason(error: BaseException) -> str | None:
    """Why no call was made for a fetch: ``circuit_open`` (the breaker is open, or calls
    are paused after a 401 / a 429's Retry-After) or ``budget`` (the workspace-wide fetch
    budget is spent); ``None`` for a call that was made and failed."""
    if isinstance(error, CircuitOpenError):
        return "circuit_open"
    if isinstance(error, RateLimitedError) and error.status_code is None:
        return "budget"  # raised by the shared layer's limiter, not by an HTTP 429
    return None


def short_endpoint(endpoint: str) -> str:
    """``"POST /experiences/fetch"`` -> ``"fetch"``."""
    return endpoint.rsplit("/", 1)[-1]


def missing_extra(what: str, package: str, extra: str) -> ConfigurationError:
    return ConfigurationError(
        f"{what} needs the {package} package: pip install 'personalize-middleware[{extra}]'",
        field="telemetry",
    )
