"""``outbox_from_settings``: the event outbox ``PersonalizeSettings.events_outbox`` names."""

from __future__ import annotations

from .._config import PersonalizeSettings
from .._exceptions import ConfigurationError
from .._interfaces import EventOutbox
from ._outbox_redis import RedisOutbox
from ._outbox_sqlite import SQLiteOutbox

__all__ = ["outbox_from_settings"]


def outbox_from_settings(settings: PersonalizeSettings) -> EventOutbox | None:
    """The outbox ``settings.events_outbox`` asks for: ``"memory"`` (``None``: the
    batcher's own in-memory queue), ``"redis"`` (needs ``redis_url``), or the path of a
    SQLite file. Unset: ``"redis"`` when ``redis_url`` is set, else ``"memory"``."""
    choice = settings.events_outbox
    if choice is None:
        choice = "redis" if settings.redis_url else "memory"
    if choice == "memory":
        return None
    if choice == "redis":
        if not settings.redis_url:
            raise ConfigurationError("events_outbox='redis' needs redis_url", field="events_outbox")
        return RedisOutbox(settings.redis_url, workspace_id=settings.workspace_id)
    return SQLiteOutbox(choice)
