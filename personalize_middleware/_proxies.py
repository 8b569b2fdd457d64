"""Trusted proxies: whose ``X-Forwarded-Proto`` says whether the visitor used https.

A server may rewrite the request before the middleware sees it: uvicorn and gunicorn's
uvicorn worker apply ``X-Forwarded-For`` / ``X-Forwarded-Proto`` from the peers listed in
``--forwarded-allow-ips`` (``127.0.0.1`` by default), which turns ``scope["client"]`` into
the visitor and ``scope["scheme"]`` into ``https``. ``trusted_proxies`` is the same idea
inside the middleware, for the peers the server does not rewrite for: the header is
believed only when the socket peer is one of them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.types import Scope

from ._config import invalid_option

__all__ = ["TrustedProxies"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_HTTPS = frozenset({"https", "wss"})


class TrustedProxies:
    """The networks whose forwarding headers are believed."""

    __slots__ = ("networks",)

    def __init__(self, proxies: Sequence[str] = ()) -> None:
        if isinstance(proxies, str):
            raise invalid_option(
                "trusted_proxies", proxies, "a list of IP addresses or networks, not a string"
            )
        networks: list[_Network] = []
        for proxy in proxies:
            try:
                networks.append(ipaddress.ip_network(proxy, strict=False))
            except (TypeError, ValueError):
                raise invalid_option(
                    "trusted_proxies",
                    proxy,
                    "IP addresses or networks such as '10.0.0.0/8' or '127.0.0.1'",
                ) from None
        self.networks: tuple[_Network, ...] = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def is_https(self, scope: Scope) -> bool:
        """Whether the visitor's request was https: the server's own scheme, or a trusted
        proxy's ``X-Forwarded-Proto`` (its right-most value: what the nearest proxy saw)."""
        if scope.get("scheme") in _HTTPS:
            return True
        if not self.networks:
            return False
        client = scope.get("client")
        if not client or not self.trusts(str(client[0])):
            return False
        proto: bytes | None = None
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-proto":
                proto = value
        if proto is None:
            return False
        return proto.decode("latin-1").rsplit(",", 1)[-1].strip().lower() == "https"
