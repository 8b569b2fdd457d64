"""MoEngage Personalize for server-rendered Starlette and FastAPI apps."""

from __future__ import annotations

from ._config import PersonalizeSettings
from ._dependencies import get_personalization, require_experiences
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
from ._identity import IdentityResolver, default_identity
from ._interfaces import PersonalizeBackend
from ._middleware import PersonalizeMiddleware
from ._models import (
    EventAction,
    EventElement,
    Experience,
    ExperienceMetadata,
    Identity,
)
from ._personalization import Personalization, current_personalization
from .cache._store import ExperienceStore, SharedLayer, StoreStats
from .cache.redis._layer import RedisSharedLayer
from .jinja._extension import (
    PersonalizedTemplateResponse,
    PersonalizeExtension,
    TemplateExperience,
    setup_jinja,
    setup_templates,
)
from .local import LocalBackend, create_local_server, load_experiences_file
from .tracking._batcher import BatcherStats, EventBatcher
from .tracking._hooks import Tracking, TrackingStats
from .upstream._client import PersonalizeClient

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "BatcherStats",
    "ConfigurationError",
    "EventAction",
    "EventBatcher",
    "EventElement",
    "Experience",
    "ExperienceMetadata",
    "ExperienceStore",
    "Identity",
    "IdentityResolver",
    "LocalBackend",
    "MalformedResponseError",
    "Personalization",
    "PersonalizeBackend",
    "PersonalizeClient",
    "PersonalizeError",
    "PersonalizeExtension",
    "PersonalizeMiddleware",
    "PersonalizeSettings",
    "PersonalizedTemplateResponse",
    "RateLimitedError",
    "RedisSharedLayer",
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
