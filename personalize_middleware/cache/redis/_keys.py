"""Key naming for everything a workspace keeps in Redis.

Every key is ``<namespace>:<format version>:{<workspace>}:<suffix>``. The braces are a Redis
Cluster hash tag: only ``<workspace>`` is hashed, so all of a workspace's keys live in ONE
slot, on one node, and every multi-key Lua script (lease + pause + data, the limiter's two
sorted sets, anything another feature adds through ``KeyNames.key``) touches one slot, as
Redis Cluster requires. The pub/sub channel carries the same tag.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection

from ..._exceptions import ConfigurationError
from ..._models import FetchQuery

__all__ = ["GENERATION_FIELD", "KeyNames", "check_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
#: The field of an identity's data hash holding its generation (``_generation.py``). Entry
#: fields are ``<context digest>:<key>``, always with a colon: no clash.
GENERATION_FIELD = "g"


def check_name(name: str, value: object) -> str:
    """``value`` if it is a valid workspace id or namespace; else a ConfigurationError."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigurationError(f"{name} must be 1-128 letters, digits, '_' or '-'", field=name)
    return value


class KeyNames:
    """The names of one workspace's keys (``namespace`` lets several apps share a Redis)."""

    __slots__ = ("namespace", "prefix", "workspace_id")

    def __init__(self, workspace_id: str, namespace: str = "pm", version: str = "v1") -> None:
        self.workspace_id = check_name("workspace_id", workspace_id)
        self.namespace = check_name("namespace", namespace)
        self.prefix = f"{namespace}:{version}:{{{workspace_id}}}:"

    def key(self, suffix: str) -> str:
        """Any key of this workspace: same hash slot as all the others."""
        return self.prefix + suffix

    def data(self, identity_digest: str) -> str:
        return f"{self.prefix}u:{identity_digest}"

    def lease(self, query: FetchQuery, keys: Collection[str], generation: str = "") -> str:
        """One fetch's lease. A fetch of a later generation (after an invalidation) gets
        another lease, so it never waits for, or takes the results of, an older fetch."""
        text = "\x1f".join(sorted(keys))
        if generation:
            text = generation + "\x1e" + text
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return f"{self.prefix}l:{query.identity_hash}:{query.context_hash}:{digest}"

    @property
    def rate_limit(self) -> str:
        return f"{self.prefix}rl"

    @property
    def pause(self) -> str:
        return f"{self.prefix}pause"

    @property
    def channel(self) -> str:
        """The pub/sub channel of invalidations and refreshes (``_broadcast.py``)."""
        return f"{self.prefix}events"

    @property
    def version(self) -> str:
        """A counter bumped with every broadcast: a process that missed a message sees it
        changed on its next poll."""
        return f"{self.prefix}version"

    @staticmethod
    def field(query: FetchQuery, key: str) -> str:
        return f"{query.context_hash}:{key}"
