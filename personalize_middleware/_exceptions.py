"""The one exception tree of personalize-middleware.

::

    PersonalizeError
    ├── ConfigurationError          bad settings, bad local experiences file
    ├── TemplateUsageError          a helper used wrongly at render time (bad b_id, ...)
    ├── InvalidTokenError           a tracking token that is malformed, forged, expired or
    │                               another visitor's (the beacon endpoint answers 403)
    ├── InvalidExperienceError      an experience or metadata entry not shaped as the API
    │                               documents (the client reports it as MalformedResponseError)
    ├── ClientClosedError           a call on a PersonalizeClient after aclose()
    ├── OutboxUnavailableError      the event outbox could not store events (Redis down,
    │                               disk full): the beacon endpoint answers 503
    └── APIError                    anything the MoEngage API (or the way to it) did
        ├── AuthenticationError     401: wrong workspace id / secret; never retried
        ├── BadRequestError         400: carries the API's title / description / code
        ├── RateLimitedError        429: carries Retry-After seconds when given
        ├── UpstreamUnavailableError  5xx, connection refused / reset
        │   └── CircuitOpenError    no call made: breaker open, or calls paused (401/429)
        ├── UpstreamTimeoutError    connect / read / pool / total timeout
        └── MalformedResponseError  not JSON, HTML error page, empty body, wrong shape

Transport errors are translated in one place (``upstream._client``)
with ``raise ... from exc``. No message ever contains the API secret or the
Authorization header.
"""

from __future__ import annotations

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "CircuitOpenError",
    "ClientClosedError",
    "ConfigurationError",
    "InvalidExperienceError",
    "InvalidTokenError",
    "MalformedResponseError",
    "OutboxUnavailableError",
    "PersonalizeError",
    "RateLimitedError",
    "TemplateUsageError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
]


class PersonalizeError(Exception):
    """Root of every error raised by personalize-middleware."""


class ConfigurationError(PersonalizeError, ValueError):
    """A setting or a configuration file is invalid. ``field`` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TemplateUsageError(PersonalizeError, ValueError):
    """A template helper was called with invalid arguments."""


class InvalidTokenError(PersonalizeError, ValueError):
    """A tracking token that is malformed, forged, expired or someone else's."""


class InvalidExperienceError(PersonalizeError, ValueError):
    """An experience or metadata entry that is not shaped as the API documents."""


class ClientClosedError(PersonalizeError, RuntimeError):
    """The ``PersonalizeClient`` was used after ``aclose()``."""


class OutboxUnavailableError(PersonalizeError):
    """The event outbox could not store (or read) events: its Redis or file failed."""


class APIError(PersonalizeError):
    """The MoEngage Personalize API call failed.

    ``retryable`` tells the caller whether the same request may succeed later.
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.endpoint = endpoint


class AuthenticationError(APIError):
    """401: the workspace id or the API secret is wrong (or was regenerated)."""


class BadRequestError(APIError):
    """400: the API refused a field. Never retried."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = 400,
        endpoint: str | None = None,
        title: str | None = None,
        description: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, endpoint=endpoint)
        self.title = title
        self.description = description
        self.code = code


class RateLimitedError(APIError):
    """429: the workspace's rate limit is spent. ``retry_after`` is in seconds."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = 429,
        endpoint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, endpoint=endpoint)
        self.retry_after = retry_after


class UpstreamUnavailableError(APIError):
    """5xx answers and connection failures."""

    retryable = True


class CircuitOpenError(UpstreamUnavailableError):
    """No call was made: the breaker is open or fetching is paused."""


class UpstreamTimeoutError(APIError):
    """The call did not complete in time."""

    retryable = True


class MalformedResponseError(APIError):
    """The answer was not the JSON shape the API documents."""

    retryable = True
