"""Per-route experience keys, matched with Starlette path patterns compiled once.

Matching runs on the event loop for every request, so its cost must stay linear in the
path whatever the patterns. Starlette's own regexes backtrack: ``/a/{p:path}/b/{q:path}/c``
against a crafted 10 KB path took half a second, and every request queued behind it.
So patterns are compiled here into a bit-parallel automaton (Baeza-Yates-Gonnet "shift-and",
with the carry trick for runs): a set of positions in the path is one Python ``int``, bit
``i`` meaning "the pattern so far matches ``path[:i]``", and every step of the pattern is a
fixed handful of ``int`` operations (shift, and, or, add) over the whole set at once. The
work is (steps in the pattern) x (path length / machine word), with no backtracking at all.

The semantics are Starlette's exactly (the tests compare with ``compile_path``'s regexes),
including its quirks: ``{x:path}`` does not match a newline, ``{x}`` does, and a path with
one trailing newline matches as if the newline were absent (the regex's ``$``). Paths are
matched as UTF-8 bytes; positions inside a multi-byte character never end a parameter.

Paths longer than ``MAX_MATCHED_PATH_BYTES`` (8 KiB of UTF-8, the request-line limit of
nginx and Apache in their default configuration) match no route pattern: they get the
site-wide keys only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from starlette.convertors import CONVERTOR_TYPES
from starlette.routing import PARAM_REGEX, compile_path

from ._config import describe_value
from ._exceptions import ConfigurationError

__all__ = ["MAX_MATCHED_PATH_BYTES", "RouteKeys", "validate_experience_key"]

#: Longer paths (UTF-8 bytes) match no route pattern; they get the site-wide keys only.
MAX_MATCHED_PATH_BYTES = 8 * 1024

_MAX_KEY_LENGTH = 256
_PATH_CACHE_SIZE = 4096
# Memoising a long path would make the memo's memory depend on what clients send.
_MEMO_MAX_PATH = 512

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

    Patterns are Starlette's: ``"/products/{id}"``, ``"/shop/{rest:path}"``, with the
    convertors ``str``, ``int``, ``float``, ``uuid`` and ``path``; a mount's prefix is part
    of the full path the middleware sees, so write it in the pattern. Matching costs time
    linear in the path; paths longer than ``MAX_MATCHED_PATH_BYTES`` get the site-wide keys.
    """

    __slots__ = ("_cache", "_compiled", "_site", "configured_keys")

    def __init__(self, routes: RoutesConfig | None = None, site_keys: Sequence[str] = ()) -> None:
        items = list(routes.items()) if isinstance(routes, Mapping) else list(routes or ())
        compiled: list[tuple[_PathPattern, tuple[str, ...]]] = []
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
            matcher = _PathPattern.compile(pattern, where)
            checked = tuple(dict.fromkeys(validate_experience_key(k, where=where) for k in keys))
            every.update(dict.fromkeys(checked))
            compiled.append((matcher, checked))
        self._compiled = tuple(compiled)
        self.configured_keys: tuple[str, ...] = tuple(every)
        self._cache: dict[str, tuple[str, ...]] = {}

    def keys_for(self, path: str) -> tuple[str, ...]:
        """The keys for ``path`` (short paths memoised, the memo bounded)."""
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        result = self._match(path)
        if len(path) <= _MEMO_MAX_PATH:
            if len(self._cache) >= _PATH_CACHE_SIZE:
                self._cache.clear()  # paths with ids are unbounded; matching is cheap anyway
            self._cache[path] = result
        return result

    def _match(self, path: str) -> tuple[str, ...]:
        if not self._compiled or len(path) > MAX_MATCHED_PATH_BYTES:
            return self._site
        data = path.encode("utf-8", "surrogatepass")
        if len(data) > MAX_MATCHED_PATH_BYTES:
            return self._site
        positions = _PositionSets(data)
        keys: dict[str, None] = dict.fromkeys(self._site)
        for matcher, route_keys in self._compiled:
            if matcher.matches(positions):
                keys.update(dict.fromkeys(route_keys))
        return tuple(keys)


# -- the automaton -----------------------------------------------------------------------
#
# A step consumes bytes of the path: ``(op, table, width)``, where ``table`` is a byte class
# given as a ``bytes.translate`` table mapping member bytes to b"1" and the others to b"0".

_EXACTLY = 0  # exactly ``width`` bytes of the class
_OPTIONAL = 1  # zero or one
_SOME = 2  # one or more
_ANY = 3  # zero or more
_DECIMALS = 4  # optionally "." and one or more digits (the float convertor's tail)

Step = tuple[int, bytes, int]


def _byte_class(members: Iterable[int]) -> bytes:
    chosen = frozenset(members)
    return bytes(0x31 if byte in chosen else 0x30 for byte in range(256))


_BYTE = tuple(_byte_class((byte,)) for byte in range(256))
_BYTE_VALUE = {table: byte for byte, table in enumerate(_BYTE)}
_BIT_PLANES = tuple(_byte_class(b for b in range(256) if b >> bit & 1) for bit in range(8))
# Masks of single bytes made by translation before switching to the bit planes.
_TRANSLATED_BYTE_MASKS = 8
_NOT_SLASH = _byte_class(byte for byte in range(256) if byte != 0x2F)
_NOT_NEWLINE = _byte_class(byte for byte in range(256) if byte != 0x0A)
_DIGIT = _byte_class(b"0123456789")
_HEX = _byte_class(b"0123456789abcdefABCDEF")
_DOT = _BYTE[ord(".")]
# UTF-8 continuation bytes: a position before one is inside a character.
_CONTINUATION = _byte_class(range(0x80, 0xC0))


def _uuid_steps(*, dash: int = 1, hex_class: bytes | None = None) -> tuple[Step, ...]:
    """The uuid convertor: five groups of hex digits, the dashes optional and either case
    (current Starlette), or required and lower case (older releases: ``dash=_EXACTLY``)."""
    digits = _HEX if hex_class is None else hex_class
    steps: list[Step] = []
    for i, width in enumerate((8, 4, 4, 4, 12)):
        if i:
            steps.append((dash, _BYTE[ord("-")], 1))
        steps.append((_EXACTLY, digits, width))
    return tuple(steps)


def _literal_steps(literal: bytes) -> list[Step]:
    steps: list[Step] = []
    for byte in literal:
        if steps and steps[-1][1] is _BYTE[byte]:
            steps[-1] = (_EXACTLY, _BYTE[byte], steps[-1][2] + 1)
        else:
            steps.append((_EXACTLY, _BYTE[byte], 1))
    return steps


# Keyed by the convertor's regex, so a convertor registered under another name with the
# same regex works, and a built-in whose regex changed in a new Starlette fails loudly.
_CONVERTOR_STEPS: dict[str, tuple[Step, ...]] = {
    "[^/]+": ((_SOME, _NOT_SLASH, 1),),
    ".*": ((_ANY, _NOT_NEWLINE, 1),),
    "[0-9]+": ((_SOME, _DIGIT, 1),),
    r"[0-9]+(\.[0-9]+)?": ((_SOME, _DIGIT, 1), (_DECIMALS, _DIGIT, 1)),
    "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}": (
        _uuid_steps()
    ),
    # Older Starlette releases (the lowest this package supports is 0.40).
    "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}": (
        _uuid_steps(dash=_EXACTLY, hex_class=_byte_class(b"0123456789abcdef"))
    ),
}


class _PositionSets:
    """One path, and the position sets of its byte classes (computed when first needed).

    Bit ``i`` of a class's mask is set when byte ``i`` of the path is in the class. Each
    mask made with ``bytes.translate`` is a pass over the path; past the first few, masks of
    single bytes (literal text) are combined from the path's eight bit planes instead, so a
    path costs at most about 20 such passes however many distinct bytes the patterns spell.
    """

    __slots__ = ("_ascii", "_boundaries", "_masks", "_planes", "_reversed", "_translations", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._reversed = b""
        self._masks: dict[tuple[bytes, int], int] = {}
        self._planes: tuple[int, ...] = ()
        self._translations = 0
        self._ascii = data.isascii()
        self._boundaries: int | None = None

    def mask(self, table: bytes, width: int = 1) -> int:
        """Bit ``i`` set when the ``width`` bytes from ``i`` on are all in the class."""
        mask = self._masks.get((table, width))
        if mask is not None:
            return mask
        if width > 1:
            half = width // 2
            mask = self.mask(table, half) & (self.mask(table, width - half) >> half)
        elif table in _BYTE_VALUE and self._translations >= _TRANSLATED_BYTE_MASKS:
            mask = self._from_bit_planes(_BYTE_VALUE[table])
        else:
            mask = self._translate(table)
        self._masks[table, width] = mask
        return mask

    def _translate(self, table: bytes) -> int:
        self._translations += 1
        if not self._reversed:
            # int(..., 2) reads the most significant bit first: reverse, so byte 0 is bit 0.
            self._reversed = self.data[::-1]
        return int(self._reversed.translate(table) or b"0", 2)

    def _from_bit_planes(self, value: int) -> int:
        if not self._planes:
            self._planes = tuple(self._translate(plane) for plane in _BIT_PLANES)
        mask = (1 << len(self.data)) - 1
        for bit, plane in enumerate(self._planes):
            mask &= plane if value >> bit & 1 else ~plane
        return mask

    def boundaries(self) -> int | None:
        """Positions between characters (and the end); ``None`` for an ASCII path."""
        if self._boundaries is None and not self._ascii:
            everywhere = (2 << len(self.data)) - 1
            self._boundaries = ~self.mask(_CONTINUATION) & everywhere
        return self._boundaries

    def run(self, steps: tuple[Step, ...], start: int) -> int:
        """The positions where ``steps`` can end, starting from the positions ``start``."""
        positions = start
        for op, table, width in steps:
            if op == _EXACTLY:
                positions = (positions & self.mask(table, width)) << width
            elif op == _OPTIONAL:
                positions |= (positions & self.mask(table)) << 1
            elif op == _SOME:
                positions = self._run_of(positions, table)
            elif op == _ANY:
                positions |= self._run_of(positions, table)
            else:
                after_dot = (positions & self.mask(_DOT)) << 1
                positions |= self._run_of(after_dot, table)
            if not positions:
                return 0
        return positions

    def _run_of(self, starts: int, table: bytes) -> int:
        """End positions of one or more bytes of the class, from any of ``starts``.

        Adding the starts to the class mask makes each carry ripple from the first start
        in a run of member bytes to the end of that run, flipping exactly the bits the run
        covers from there: all of it in O(length / word) however many starts there are.
        """
        members = self.mask(table)
        live = starts & members
        if not live:
            return 0
        covered = (((members + live) ^ members) | live) & members
        ends = covered << 1
        boundaries = self.boundaries()  # a parameter never ends inside a character
        return ends if boundaries is None else ends & boundaries


class _PathPattern:
    """A Starlette path pattern: its literal prefix and suffix, and the steps in between."""

    __slots__ = ("prefix", "steps", "suffix")

    def __init__(self, prefix: bytes, steps: tuple[Step, ...], suffix: bytes) -> None:
        self.prefix = prefix
        self.steps = steps
        self.suffix = suffix

    @classmethod
    def compile(cls, pattern: str, where: str) -> _PathPattern:
        try:
            compile_path(pattern)  # Starlette's checks: unknown convertor, duplicate names
        except (ValueError, AssertionError) as exc:
            raise ConfigurationError(f"{where}: invalid pattern: {exc}", field="routes") from exc
        params = list(PARAM_REGEX.finditer(pattern))
        if not params:
            return cls(_utf8(pattern), (), b"")
        steps: list[Step] = []
        for i, param in enumerate(params):
            if i:
                steps += _literal_steps(_utf8(pattern[params[i - 1].end() : param.start()]))
            convertor = (param.group(2) or ":str")[1:]
            regex = CONVERTOR_TYPES[convertor].regex
            if regex not in _CONVERTOR_STEPS:
                raise ConfigurationError(
                    f"{where}: the convertor {convertor!r} is not supported in route patterns "
                    "(use str, int, float, uuid or path)",
                    field="routes",
                )
            steps.extend(_CONVERTOR_STEPS[regex])
        prefix = _utf8(pattern[: params[0].start()])
        return cls(prefix, tuple(steps), _utf8(pattern[params[-1].end() :]))

    def matches(self, path: _PositionSets) -> bool:
        data, prefix, suffix = path.data, self.prefix, self.suffix
        # The regex ends with ``$``, which also matches before one trailing newline.
        trimmed = len(data) - 1 if data.endswith(b"\n") else None
        if not self.steps:
            return data == prefix or (trimmed is not None and data[:trimmed] == prefix)
        if not data.startswith(prefix):
            return False
        # Where the last parameter must end for the literal suffix to finish the path.
        targets = 0
        if data.endswith(suffix):
            targets |= 1 << (len(data) - len(suffix))
        if trimmed is not None and data.endswith(suffix, 0, trimmed):
            targets |= 1 << (trimmed - len(suffix))
        return bool(targets) and bool(path.run(self.steps, 1 << len(prefix)) & targets)


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")
