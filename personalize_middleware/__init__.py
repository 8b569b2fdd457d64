"""MoEngage Personalize for server-rendered Starlette and FastAPI apps."""

from __future__ import annotations

from ._config import PersonalizeSettings
from ._dependencies import get_personalization, require_experiences
from ._exceptions import (
    APIError,
    AuthenticationError,
    BadRequestError,
    CircuitOpenError,
    ConfigurationError,
    InvalidTokenError,
    MalformedResponseError,
    PersonalizeError,
    RateLimitedError,
    TemplateUsageError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from ._identity import IdentityResolver, default_identity
from ._interfaces import PersonalizeBackend, SharedEntries, SharedLayer
from ._lifecycle import Lifecycle
from ._middleware import PersonalizeMiddleware
from ._models import (
    EventAction,
    EventElement,
    Experience,
    ExperienceMetadata,
    Identity,
)
from ._personalization import Personalization, current_personalization
from ._retry import RetryPolicy
from ._signing import Keyring
from ._version import __version__ as __version__
from .cache import ExperienceStore, StoreStats
from .cache.redis import RedisSharedLayer
from .jinja import (
    PersonalizedTemplateResponse,
    PersonalizeExtension,
    PersonalizeTemplates,
    TemplateExperience,
    setup_jinja,
    setup_templates,
)
from .local import LocalBackend, create_local_server, load_experiences_file
from .tracking import BatcherStats, EventBatcher, EventRecorder, Tracking, TrackingStats
from .upstream import CircuitBreaker, PersonalizeClient

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "BatcherStats",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigurationError",
    "EventAction",
    "EventBatcher",
    "EventElement",
    "EventRecorder",
    "Experience",
    "ExperienceMetadata",
    "ExperienceStore",
    "Identity",
    "IdentityResolver",
    "InvalidTokenError",
    "Keyring",
    "Lifecycle",
    "LocalBackend",
    "MalformedResponseError",
    "Personalization",
    "PersonalizeBackend",
    "PersonalizeClient",
    "PersonalizeError",
    "PersonalizeExtension",
    "PersonalizeMiddleware",
    "PersonalizeSettings",
    "PersonalizeTemplates",
    "PersonalizedTemplateResponse",
    "RateLimitedError",
    "RedisSharedLayer",
    "RetryPolicy",
    "SharedEntries",
    "SharedLayer",
    "StoreStats",
    "TemplateExperience",
    "TemplateUsageError",
    "Tracking",
    "TrackingStats",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "create_local_server",
    "current_personalization",
    "default_identity",
    "get_personalization",
    "load_experiences_file",
    "require_experiences",
    "setup_jinja",
    "setup_templates",
]
