"""MoEngage Personalize for server-rendered Starlette and FastAPI apps."""

from __future__ import annotations

from ._config import PersonalizeSettings
from ._decisions import Decision
from ._dependencies import get_personalization, require_experiences
from ._exceptions import (
    APIError,
    AuthenticationError,
    BadRequestError,
    CircuitOpenError,
    ClientClosedError,
    ConfigurationError,
    InvalidExperienceError,
    InvalidTokenError,
    MalformedResponseError,
    PersonalizeError,
    RateLimitedError,
    TemplateUsageError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from ._grants import PreviewGrant, preview_link, qa_link
from ._identity import IdentityResolver, default_identity
from ._interfaces import (
    EventOutbox,
    KeyOutcome,
    PageTrace,
    PersonalizeBackend,
    SharedEntries,
    SharedLayer,
    Telemetry,
)
from ._lifecycle import Lifecycle
from ._middleware import PersonalizeMiddleware
from ._models import (
    EventAction,
    EventElement,
    Experience,
    ExperienceMetadata,
    Identity,
)
from ._options import AttributeOptions, CacheOptions, CookieOptions, TrackingOptions
from ._personalization import Personalization, current_personalization
from ._retry import RetryPolicy
from ._signing import Keyring
from ._version import __version__ as __version__
from .cache import ClientLimits, ExperienceStore, StoreStats
from .cache.redis import RedisSharedLayer
from .jinja import (
    PersonalizedTemplateResponse,
    PersonalizeExtension,
    PersonalizeTemplates,
    TemplateExperience,
    set_allowed_url_hosts,
    setup_jinja,
    setup_templates,
)
from .local import LocalBackend, create_local_server, load_experiences_file
from .telemetry import OpenTelemetry, PrometheusMetrics
from .tracking import (
    BatcherStats,
    EventBatcher,
    EventRecorder,
    MemoryOutbox,
    RedisOutbox,
    SQLiteOutbox,
    Tracking,
    TrackingLimits,
    TrackingStats,
    is_bot,
)
from .upstream import CircuitBreaker, PersonalizeClient

__all__ = [
    "APIError",
    "AttributeOptions",
    "AuthenticationError",
    "BadRequestError",
    "BatcherStats",
    "CacheOptions",
    "CircuitBreaker",
    "CircuitOpenError",
    "ClientClosedError",
    "ClientLimits",
    "ConfigurationError",
    "CookieOptions",
    "Decision",
    "EventAction",
    "EventBatcher",
    "EventElement",
    "EventOutbox",
    "EventRecorder",
    "Experience",
    "ExperienceMetadata",
    "ExperienceStore",
    "Identity",
    "IdentityResolver",
    "InvalidExperienceError",
    "InvalidTokenError",
    "KeyOutcome",
    "Keyring",
    "Lifecycle",
    "LocalBackend",
    "MalformedResponseError",
    "MemoryOutbox",
    "OpenTelemetry",
    "PageTrace",
    "Personalization",
    "PersonalizeBackend",
    "PersonalizeClient",
    "PersonalizeError",
    "PersonalizeExtension",
    "PersonalizeMiddleware",
    "PersonalizeSettings",
    "PersonalizeTemplates",
    "PersonalizedTemplateResponse",
    "PreviewGrant",
    "PrometheusMetrics",
    "RateLimitedError",
    "RedisOutbox",
    "RedisSharedLayer",
    "RetryPolicy",
    "SQLiteOutbox",
    "SharedEntries",
    "SharedLayer",
    "StoreStats",
    "Telemetry",
    "TemplateExperience",
    "TemplateUsageError",
    "Tracking",
    "TrackingLimits",
    "TrackingOptions",
    "TrackingStats",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "create_local_server",
    "current_personalization",
    "default_identity",
    "get_personalization",
    "is_bot",
    "load_experiences_file",
    "preview_link",
    "qa_link",
    "require_experiences",
    "set_allowed_url_hosts",
    "setup_jinja",
    "setup_templates",
]
