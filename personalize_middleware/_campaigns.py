"""Campaign changes reach every process: statuses, cached entries, the other processes.

When the metadata watcher sees a status change (an experience paused, or Active again),
the cached entries of those keys are forgotten and, when this process found the change on
its own, every other process is told through the shared layer (``Broadcaster``: Redis
pub/sub, with a polled version key for messages a process missed). A process told
refreshes its metadata at once and forgets the keys named. Without a shared layer each
process finds the change at its own next refresh (``metadata_refresh`` seconds).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._interfaces import Broadcaster

if TYPE_CHECKING:
    from .cache import ExperienceStore
    from .upstream import MetadataWatcher

__all__ = ["CampaignSync"]


class CampaignSync:
    """Wires a store, its shared layer and a metadata watcher (``None``: no watcher)."""

    def __init__(self, store: ExperienceStore, metadata: MetadataWatcher | None) -> None:
        self.store = store
        self.metadata = metadata
        self.shared = store.shared if isinstance(store.shared, Broadcaster) else None
        if metadata is not None:
            metadata.on_change = self._statuses_changed
        if self.shared is not None:
            self.shared.add_listener(self._on_broadcast)

    async def refresh(self, keys: Iterable[str] = ()) -> int:
        """Refresh here and in every process; forget ``keys`` everywhere."""
        wanted = [k for k in dict.fromkeys(keys) if isinstance(k, str)]
        if wanted:
            self.store.forget(wanted)
        if self.metadata is not None:
            self.metadata.request_refresh()
        if self.shared is None:
            return 0
        return await self.shared.publish_refresh(wanted or None)

    async def _statuses_changed(self, keys: frozenset[str], requested: bool) -> None:
        self.store.forget(keys)
        if not requested and self.shared is not None:
            await self.shared.publish_refresh(sorted(keys))

    def _on_broadcast(self, message: Mapping[str, Any]) -> None:
        # The store forgets the keys named itself; the statuses are the watcher's.
        if message.get("kind") == "refresh" and self.metadata is not None:
            self.metadata.request_refresh()
