"""Known crawlers, by user agent: ``is_bot(user_agent)``.

The list is a vendored snapshot of the crawler-user-agents project
(``crawler-user-agents.txt`` beside this module: its source, date and licence are at
the top of that file; docs/tracking.md says how to update it). Upstream's entries are
regular expressions meant to be OR-ed into one pattern; run with a backtracking engine
over attacker-chosen headers, ~1,500 alternatives cost time per request that grows
with both, and a future entry could backtrack badly. So nothing of upstream's syntax
runs here: on first use (``Tracking.start``) each entry is compiled *down* to literal
tokens, lower-cased:

- ``Googlebot\\/`` becomes the token ``googlebot/``; ``[wW]get`` becomes ``wget``;
  ``(Bot|SiteAudit)`` becomes two alternatives;
- ``^X`` / ``X$`` keep their anchor (``^Silk/`` is a crawler, ``... Silk/...`` is
  Amazon's browser);
- what is not a literal (``\\d``, ``.``, ``[^-]``, ``x?``, ``[\\s\\S]*``) becomes a gap:
  the tokens around it must appear in that order, with anything between.

Every string upstream's pattern matches (case-insensitively) therefore matches here
too; a gap can only match more, and a test checks the vendored list against upstream's
regexes. Matching is one scan of the lower-cased user agent by a regex made of the
unanchored single tokens folded into a trie (literals only: no quantifier, nothing to
backtrack into, so each position costs at most the longest token), ``startswith`` /
``endswith`` over tuples for the anchored ones, and ordered ``str.find`` for the few
entries of several tokens. Results are memoised per user agent (bounded LRU).
"""

from __future__ import annotations

import enum
import functools
import importlib.resources
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._exceptions import ConfigurationError

if TYPE_CHECKING:
    from .._interfaces import PageView

__all__ = [
    "BOT_LIST_FILE",
    "BotPatternError",
    "check_bots",
    "is_bot",
    "literal_alternatives",
    "load_patterns",
    "page_user_agent",
]

#: The vendored list, a file of this package.
BOT_LIST_FILE = "crawler-user-agents.txt"
#: A user agent is looked at up to this many characters (real ones are ~100-300).
MAX_USER_AGENT = 1024
_MEMO_SIZE = 4096
_MAX_ALTERNATIVES = 64  # per entry: more means the entry is not a list of names
_MAX_CLASS_EXPANSION = 4  # [Cc] expands; a wider class becomes a gap


class _Mark(enum.Enum):
    GAP = "anything"
    START = "^"
    END = "$"


_GAP, _START, _END = _Mark.GAP, _Mark.START, _Mark.END
_SHORTHANDS = frozenset("dDwWsS")
_ESCAPABLE = frozenset("\\/.-()[]{}|^$*+?!@#%&=:;,'\"<>~` _")


class BotPatternError(ValueError):
    """An entry of the bot list uses regex syntax the literal compiler does not know."""


@dataclass(frozen=True, slots=True)
class Alternative:
    """One way an entry matches: ``tokens`` in this order, with anything between them;
    ``start`` / ``end``: the first token starts / the last ends the user agent."""

    tokens: tuple[str, ...]
    start: bool = False
    end: bool = False

    def matches(self, text: str) -> bool:
        """``text`` is lower-cased. Like a regex's ``$``, an end also matches before a
        final newline."""
        if self.end and text.endswith("\n") and self._matches(text[:-1]):
            return True
        return self._matches(text)

    def _matches(self, text: str) -> bool:
        position = 0
        last = len(self.tokens) - 1
        for index, token in enumerate(self.tokens):
            if index == 0 and self.start:
                if not text.startswith(token):
                    return False
                position = len(token)
            elif index == last and self.end:
                return text.endswith(token) and len(text) - len(token) >= position
            else:
                found = text.find(token, position)
                if found < 0:
                    return False
                position = found + len(token)
        return not self.end or position == len(text)


# -- the literal compiler --------------------------------------------------------------------
# An entry parses into alternatives; each alternative is a list of items: a frozenset of
# (lower-case) characters (one of them), _GAP, _START or _END.

Item = frozenset[str] | _Mark


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.pos = 0

    def fail(self, why: str) -> BotPatternError:
        return BotPatternError(f"bot list entry {self.pattern!r}: {why} at {self.pos}")

    def peek(self) -> str | None:
        return self.pattern[self.pos] if self.pos < len(self.pattern) else None

    def parse(self) -> list[list[Item]]:
        alternatives = self.alternation()
        if self.pos != len(self.pattern):
            raise self.fail("unbalanced ')'")
        return alternatives

    def alternation(self) -> list[list[Item]]:
        alternatives = self.sequence()
        while self.peek() == "|":
            self.pos += 1
            alternatives = alternatives + self.sequence()
            if len(alternatives) > _MAX_ALTERNATIVES:
                raise self.fail("too many alternatives")
        return alternatives

    def sequence(self) -> list[list[Item]]:
        result: list[list[Item]] = [[]]
        while (char := self.peek()) is not None and char not in "|)":
            atom = self.atom()
            atom = self.quantified(atom)
            result = [left + right for left, right in itertools.product(result, atom)]
            if len(result) > _MAX_ALTERNATIVES:
                raise self.fail("too many alternatives")
        return result

    def atom(self) -> list[list[Item]]:
        char = self.pattern[self.pos]
        self.pos += 1
        if char == "(":
            if self.pattern.startswith("?:", self.pos):
                self.pos += 2
            elif self.peek() == "?":
                raise self.fail("unsupported group")
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("missing ')'")
            self.pos += 1
            return inner
        if char == "[":
            return [[self.char_class()]]
        if char == "\\":
            return [[self.escape()]]
        if char == ".":
            return [[_GAP]]
        if char == "^":
            return [[_START]]
        if char == "$":
            return [[_END]]
        if char in "*+?{":
            raise self.fail("quantifier without an atom")
        return [[frozenset({char.lower()})]]

    def escape(self) -> Item:
        char = self.peek()
        if char is None:
            raise self.fail("trailing backslash")
        self.pos += 1
        if char in _SHORTHANDS:
            return _GAP
        if char in _ESCAPABLE:
            return frozenset({char.lower()})
        raise self.fail(f"unsupported escape \\{char}")

    def char_class(self) -> Item:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        chars: set[str] = set()
        wide = negated
        first = True
        while True:
            char = self.peek()
            if char is None:
                raise self.fail("missing ']'")
            if char == "]" and not first:
                self.pos += 1
                break
            first = False
            self.pos += 1
            if char == "\\":
                escaped = self.escape()
                if isinstance(escaped, frozenset):
                    chars |= escaped
                else:
                    wide = True
            elif self.peek() == "-" and self.pattern[self.pos + 1 : self.pos + 2] not in ("]", ""):
                self.pos += 2  # a range: any of many characters
                wide = True
            else:
                chars.add(char.lower())
        if wide or len(chars) > _MAX_CLASS_EXPANSION or not chars:
            return _GAP
        return frozenset(chars)

    def quantified(self, atom: list[list[Item]]) -> list[list[Item]]:
        char = self.peek()
        if char in ("*", "?"):
            self.pos += 1
            return [[_GAP]]  # may be absent: anything covers both
        if char == "+":
            self.pos += 1
            return [[*items, _GAP] for items in atom]  # once, then maybe more
        if char == "{":
            end = self.pattern.find("}", self.pos)
            bounds = self.pattern[self.pos + 1 : end].split(",") if end > 0 else []
            if not bounds or not all(b.strip().isdigit() or b == "" for b in bounds):
                raise self.fail("bad repetition")
            self.pos = end + 1
            at_least = int(bounds[0] or 0)
            return [[*items, _GAP] for items in atom] if at_least else [[_GAP]]
        return atom


def literal_alternatives(pattern: str) -> list[Alternative]:
    """The literal form of one entry of the list (see the module docstring). Raises
    ``BotPatternError`` for syntax outside the supported subset, or for an entry that
    would match every user agent."""
    parser = _Parser(pattern)
    alternatives: list[Alternative] = []
    for items in parser.parse():
        expanded: list[list[Item]] = [[]]
        for item in items:  # small classes ([Cc], [pP]) expand into alternatives
            choices: list[Item] = (
                [frozenset(c) for c in sorted(item)] if isinstance(item, frozenset) else [item]
            )
            expanded = [[*left, choice] for left in expanded for choice in choices]
            if len(expanded) > _MAX_ALTERNATIVES:
                raise parser.fail("too many alternatives")
        alternatives.extend(_alternative(parser, seq) for seq in expanded)
    return list(dict.fromkeys(alternatives))


def _alternative(parser: _Parser, items: list[Item]) -> Alternative:
    start = bool(items) and items[0] is _START
    end = bool(items) and items[-1] is _END
    body = items[1 if start else 0 : len(items) - 1 if end else len(items)]
    if _START in body or _END in body:
        raise parser.fail("an anchor inside the pattern")
    tokens = [
        "".join(char for item in group if isinstance(item, frozenset) for char in item)
        for is_gap, group in itertools.groupby(body, key=lambda i: i is _GAP)
        if not is_gap
    ]
    if not tokens:
        raise parser.fail("matches every user agent")
    # A gap next to an anchor unanchors that side.
    start = start and body[0] is not _GAP
    end = end and body[-1] is not _GAP
    return Alternative(tuple(tokens), start=start, end=end)


# -- the matcher -------------------------------------------------------------------------------


class _Matcher:
    def __init__(self, alternatives: list[Alternative]) -> None:
        anywhere: set[str] = set()
        prefixes: set[str] = set()
        suffixes: set[str] = set()
        exact: set[str] = set()
        complex_: list[Alternative] = []
        for alt in alternatives:
            if len(alt.tokens) != 1:
                complex_.append(alt)
            elif alt.start and alt.end:
                exact.update((alt.tokens[0], alt.tokens[0] + "\n"))  # "$" as a regex has it
            elif alt.start:
                prefixes.add(alt.tokens[0])
            elif alt.end:
                suffixes.update((alt.tokens[0], alt.tokens[0] + "\n"))
            else:
                anywhere.add(alt.tokens[0])
        self.search = re.compile(_trie_regex(anywhere)).search if anywhere else None
        self.prefixes = tuple(sorted(prefixes))
        self.suffixes = tuple(sorted(suffixes))
        self.exact = frozenset(exact)
        self.complex = tuple(complex_)

    def __call__(self, text: str) -> bool:
        return (
            (self.search is not None and self.search(text) is not None)
            or text.startswith(self.prefixes)
            or text.endswith(self.suffixes)
            or text in self.exact
            or any(alt.matches(text) for alt in self.complex)
        )


def _trie_regex(tokens: set[str]) -> str:
    """One regex of literals for ``tokens``, factored into a trie: at each position the
    engine follows one branch per character, so a scan costs at most the longest token
    per position. A token that contains another is dropped (the shorter one matches)."""
    root: dict[str, dict] = {}  # type: ignore[type-arg]
    for token in sorted(tokens, key=len):
        node = root
        for char in token:
            if "" in node:
                break  # a shorter token already ends here
            node = node.setdefault(char, {})
        else:
            node.clear()
            node[""] = {}
    return _node_regex(root)


def _node_regex(node: dict) -> str:  # type: ignore[type-arg]
    if "" in node:
        return ""
    branches = [re.escape(char) + _node_regex(child) for char, child in sorted(node.items())]
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


def load_patterns(text: str) -> list[str]:
    """The entries of a list file: every line that is not empty nor a ``#`` comment."""
    return [line for line in text.split("\n") if line and not line.startswith("#")]


@functools.cache
def _matcher() -> _Matcher:
    text = (
        importlib.resources.files("personalize_middleware.tracking")
        .joinpath(BOT_LIST_FILE)
        .read_text(encoding="utf-8")
    )
    alternatives = [alt for entry in load_patterns(text) for alt in literal_alternatives(entry)]
    return _Matcher(alternatives)


def is_bot(user_agent: str | bytes | None) -> bool:
    """True when ``user_agent`` is a known crawler's (the vendored crawler-user-agents
    list, case-insensitive). An absent or empty user agent is not a *known* crawler:
    ``False``. Linear in the user agent's length (at most ``MAX_USER_AGENT`` characters
    are looked at) and memoised per user agent (bounded)."""
    if not user_agent:
        return False
    if isinstance(user_agent, bytes):
        user_agent = user_agent.decode("latin-1")
    return _classify(user_agent[:MAX_USER_AGENT])


@functools.lru_cache(maxsize=_MEMO_SIZE)
def _classify(user_agent: str) -> bool:
    return _matcher()(user_agent.lower())


def page_user_agent(handle: PageView) -> str | None:
    """The user agent a page view was requested with: its ``user_agent`` if it has one,
    else the ``USER_AGENT`` session attribute (sent to MoEngage unless
    ``send_user_agent=False``)."""
    user_agent: Any = getattr(handle, "user_agent", None)
    if user_agent is None:
        attributes = getattr(handle, "attributes", None)
        if isinstance(attributes, Mapping):
            user_agent = attributes.get("USER_AGENT")
    return user_agent if isinstance(user_agent, str) else None


def check_bots(value: object) -> Literal["ignore", "track"]:
    """``value`` if it is a ``bots`` setting (``"ignore"`` or ``"track"``)."""
    if value == "ignore":
        return "ignore"
    if value == "track":
        return "track"
    raise ConfigurationError("bots must be 'ignore' or 'track'", field="bots")
