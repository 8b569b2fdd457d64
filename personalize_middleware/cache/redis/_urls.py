"""``redis_url`` forms, and the redis-py client each one builds.

=================================================  =====================================
``redis://[[user]:password@]host[:port][/db]``     one Redis (also ``rediss://``, TLS)
``unix://[[user]:password@]/path/to/socket``       one Redis on a Unix socket
``redis+cluster://[[user]:password@]h1:p1[,h2:p2]`` a Redis Cluster; the nodes listed are
                                                   seeds, the rest is discovered
                                                   (``rediss+cluster://`` for TLS)
``redis+sentinel://[[user]:password@]s1:p1[,s2:p2]/service[/db]``
                                                   the primary Sentinel names
                                                   ``service``; the password is the
                                                   primary's (``?sentinel_password=``
                                                   for the Sentinels'); ``rediss+sentinel``
=================================================  =====================================
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

from ..._exceptions import ConfigurationError

__all__ = ["URL_SCHEMES", "RedisTarget", "build_client", "parse_redis_url"]

URL_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
_HOST_PORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\],]+)(?::(\d{1,5}))?$")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where ``redis_url`` points: ``kind`` is ``"single"``, ``"cluster"`` or ``"sentinel"``."""

    kind: str
    url: str = field(repr=False)  # may hold a password
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    ssl: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


def _fail(message: str) -> ConfigurationError:
    return ConfigurationError(f"redis_url: {message}", field="redis_url")


def _nodes(netloc_hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    nodes = []
    for part in netloc_hosts.split(","):
        match = _HOST_PORT_RE.match(part.strip())
        if match is None:
            raise _fail(f"{part!r} is not host[:port]")
        host = match.group(1).strip("[]")
        port = int(match.group(2) or default_port)
        if not 0 < port < 65536:
            raise _fail(f"port {port} is out of range")
        nodes.append((host, port))
    return tuple(nodes)


def parse_redis_url(url: object) -> RedisTarget:
    """The target of ``url``, or a ``ConfigurationError`` saying what is wrong with it."""
    if not isinstance(url, str) or "://" not in url:
        raise _fail(f"must start with one of {', '.join(s + '://' for s in URL_SCHEMES)}")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in URL_SCHEMES:
        raise _fail(f"must start with one of {', '.join(s + '://' for s in URL_SCHEMES)}")
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget(kind="single", url=url, ssl=scheme == "rediss")
    rest = url.split("://", 1)[1]
    auth, _, hosts_and_path = rest.rpartition("@")
    hosts, _, path_query = hosts_and_path.partition("/")
    path, _, query = path_query.partition("?")
    username = password = None
    if auth:
        user, sep, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    if not hosts:
        raise _fail("names no host")
    nodes = _nodes(hosts, 26379 if scheme.endswith("sentinel") else 6379)
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    ssl = scheme.startswith("rediss")
    if scheme.endswith("cluster"):
        if path.strip("/") not in ("", "0"):
            raise _fail("a Redis Cluster has only database 0")
        return RedisTarget(
            kind="cluster", url=url, nodes=nodes, ssl=ssl, username=username, password=password
        )
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise _fail("a Sentinel URL ends in /<service name>[/<db>]")
    db = parts[1] if len(parts) == 2 else options.get("db", "0")
    if not db.isdigit():
        raise _fail(f"database must be a number, got {db!r}")
    return RedisTarget(
        kind="sentinel",
        url=url,
        nodes=nodes,
        service=parts[0],
        db=int(db),
        ssl=ssl,
        username=username,
        password=password,
        sentinel_password=options.get("sentinel_password"),
    )


def build_client(redis: Any, target: RedisTarget, **options: Any) -> Any:
    """The ``redis.asyncio`` client for ``target`` (``options``: timeouts, retry)."""
    if target.kind == "single":
        return redis.Redis.from_url(target.url, **options)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.ssl:
        auth["ssl"] = True
    if target.kind == "cluster":
        cluster = importlib.import_module("redis.asyncio.cluster")
        return cluster.RedisCluster(
            startup_nodes=[cluster.ClusterNode(host, port) for host, port in target.nodes],
            **auth,
            **options,
        )
    sentinel = importlib.import_module("redis.asyncio.sentinel")
    sentinel_kwargs = {
        key: value
        for key, value in options.items()
        if key in ("socket_timeout", "socket_connect_timeout")
    }
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    if target.ssl:
        sentinel_kwargs["ssl"] = True
    manager = sentinel.Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs, **options)
    tls = {"ssl": True} if target.ssl else {}
    return manager.master_for(
        target.service, db=target.db, username=target.username, password=target.password, **tls
    )
