"""Per-route experience keys, matched with Starlette path patterns compiled once."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from starlette.routing import compile_path

from ._config import describe_value
from ._exceptions import ConfigurationError

__all__ = ["RouteKeys", "validate_experience_key"]

_MAX_KEY_LENGTH = 256
_PATH_CACHE_SIZE = 4096

RoutesConfig = Mapping[str, Sequence[str]] | Iterable[tuple[str, Sequence[str]]]


def validate_experience_key(key: object, *, where: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ConfigurationError(
            f"{where}: experience key {describe_value(key)}: expected a non-empty string",
            field=where,
        )
    if len(key) > _MAX_KEY_LENGTH or not key.isprintable():
        raise ConfigurationError(
            f"{where}: experience key {key[:40]!r} must be printable and at most "
            f"{_MAX_KEY_LENGTH} characters",
            field=where,
        )
    return key


class RouteKeys:
    """Which experience keys a path needs: the site-wide keys plus the keys of EVERY route
    pattern that matches (in configuration order, duplicates removed).

    Patterns are Starlette's: ``"/products/{id}"``, ``"/shop/{rest:path}"``; a mount's
    prefix is part of the full path the middleware sees, so write it in the pattern.
    """

    __slots__ = ("_cache", "_compiled", "_site", "configured_keys")

    def __init__(self, routes: RoutesConfig | None = None, site_keys: Sequence[str] = ()) -> None:
        items = list(routes.items()) if isinstance(routes, Mapping) else list(routes or ())
        compiled: list[tuple[re.Pattern[str], tuple[str, ...]]] = []
        every: dict[str, None] = {}
        if isinstance(site_keys, str):
            raise ConfigurationError(
                f"site_keys={describe_value(site_keys)}: expected a list of keys, e.g. "
                f"[{site_keys!r}]",
                field="site_keys",
            )
        self._site = tuple(
            dict.fromkeys(validate_experience_key(k, where="site_keys") for k in site_keys)
        )
        every.update(dict.fromkeys(self._site))
        for item in items:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise ConfigurationError(
                    f"routes={describe_value(routes)}: expected a dict of path pattern -> "
                    "list of keys, e.g. {'/': ['hero-banner']}",
                    field="routes",
                )
            pattern, keys = item
            where = f"routes[{pattern!r}]"
            if not isinstance(pattern, str) or not pattern.startswith("/"):
                raise ConfigurationError(
                    f"routes key {describe_value(pattern)}: expected a path pattern starting "
                    "with '/', e.g. '/products/{id}'",
                    field="routes",
                )
            if isinstance(keys, str):
                raise ConfigurationError(
                    f"{where}={keys!r}: expected a list of keys, e.g. [{keys!r}]",
                    field="routes",
                )
            try:
                regex, _, _ = compile_path(pattern)
            except (ValueError, AssertionError) as exc:
                raise ConfigurationError(
                    f"{where}: invalid pattern: {exc}", field="routes"
                ) from exc
            checked = tuple(dict.fromkeys(validate_experience_key(k, where=where) for k in keys))
            every.update(dict.fromkeys(checked))
            compiled.append((regex, checked))
        self._compiled = tuple(compiled)
        self.configured_keys: tuple[str, ...] = tuple(every)
        self._cache: dict[str, tuple[str, ...]] = {}

    def keys_for(self, path: str) -> tuple[str, ...]:
        """The keys for ``path`` (memoised per path, bounded)."""
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        keys: dict[str, None] = dict.fromkeys(self._site)
        for regex, route_keys in self._compiled:
            if regex.match(path):
                keys.update(dict.fromkeys(route_keys))
        result = tuple(keys)
        if len(self._cache) >= _PATH_CACHE_SIZE:
            self._cache.clear()  # paths with ids are unbounded; matching is cheap anyway
        self._cache[path] = result
        return result
