"""MoEngage Personalize for server-rendered Starlette and FastAPI apps."""

from __future__ import annotations

from ._backend import PersonalizeBackend
from ._client import PersonalizeClient
from ._config import PersonalizeSettings
from ._exceptions import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    MalformedResponseError,
    PersonalizeError,
    RateLimitedError,
    TemplateUsageError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from ._models import (
    EventAction,
    EventElement,
    Experience,
    ExperienceMetadata,
    Identity,
)

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "EventAction",
    "EventElement",
    "Experience",
    "ExperienceMetadata",
    "Identity",
    "MalformedResponseError",
    "PersonalizeBackend",
    "PersonalizeClient",
    "PersonalizeError",
    "PersonalizeSettings",
    "RateLimitedError",
    "TemplateUsageError",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
]
