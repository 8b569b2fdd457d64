"""Payload values where escaping cannot help: what ``personalize-middleware check
--templates`` reports.

Autoescaping keeps a value inside its attribute, but some places run or fetch what they
hold: a URL attribute (``href``, ``src``, ``action``...) runs ``javascript:``, an event
handler attribute or ``style`` is code, an unquoted value ends at the first space, and a
value inside a tag (outside any attribute value) adds attributes. This module finds
payload reads in those places:

- Jinja's own lexer splits a template into text and tags (so ``{% raw %}``, comments and
  ``}}`` inside strings are handled as Jinja does);
- the text runs through a small HTML tokenizer that knows whether it is in text, in a
  tag, in an attribute value (which attribute, quoted or not), or in a ``<script>`` /
  ``<style>`` element;
- each ``{{ ... }}`` met in one of those places is parsed with Jinja's parser, and its
  payload reads are classified: ``hero.url(...)``, ``personalize_url(...)`` and anything
  under ``| safe_url`` are URLs; ``hero.number/boolean/key/variation_id`` are scalars;
  every other read of an experience (``hero.Title``, ``hero["Title"]``, ``hero.get``,
  ``hero.string``, ``hero.json``, ``personalize_value(...)``) is raw text.

An experience is a name bound by ``{% experience ... as NAME %}`` or assigned from
``personalize_experience(...)`` (``set`` / ``with``) anywhere in the file, or a
``personalize_experience(...)`` call itself. A careful scan, not a browser: values passed
in by the handler under other names are not followed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, TemplateSyntaxError, nodes

__all__ = ["TEMPLATE_SUFFIXES", "LintFinding", "lint_template", "lint_templates"]

#: Files ``lint_templates`` reads in a directory.
TEMPLATE_SUFFIXES = (".html", ".htm", ".xhtml", ".jinja", ".jinja2", ".j2", ".svg", ".xml")

#: Attributes whose value a browser follows or fetches as a URL.
URL_ATTRIBUTES = frozenset(
    {
        "action", "archive", "background", "cite", "classid", "codebase", "data",
        "dynsrc", "formaction", "href", "icon", "longdesc", "lowsrc", "manifest", "ping",
        "poster", "profile", "src", "srcset", "usemap", "xlink:href",
    }
)  # fmt: skip
#: Attributes whose value is code or markup: no payload value belongs there, checked or not.
CODE_ATTRIBUTES = frozenset({"style", "srcdoc"})

_READERS_URL = frozenset({"url"})
_READERS_SCALAR = frozenset({"number", "boolean", "key", "variation_id"})
_URL_FILTERS = frozenset({"safe_url"})
_HANDLE_FUNCTION = "personalize_experience"
_VALUE_FUNCTION = "personalize_value"
_URL_FUNCTION = "personalize_url"
_SPACE = " \t\n\r\f"
# A URL value whose fixed start already settles scheme and host: what follows is a path,
# a query or a fragment (``/product/{{ ... }}``, ``https://cdn.example/{{ ... }}``,
# ``?q={{ ... }}``). A lone ``/`` settles nothing: ``/`` + ``/evil.example``; "\0" marks
# where an earlier expression's output goes.
_ANCHORED_URL = re.compile(r"\s*(?:/[^/\\\s\0]|https?://[^/?#\s]+[/?#]|[?#])", re.I)


@dataclass(frozen=True, slots=True)
class _Place:
    """Where an expression is: ``context`` is ``attribute`` (``name`` the attribute,
    ``prefix`` the value's text before it), ``tag``, ``script`` or ``style``."""

    context: str
    name: str
    quoted: bool = True
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class LintFinding:
    """One warning: ``str()`` is ``path:line: message``."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def lint_templates(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[LintFinding], int]:
    """Lint every template file under ``paths`` (files, or directories searched for
    ``TEMPLATE_SUFFIXES``); the findings, and how many files were read. A path that does
    not exist is a ``FileNotFoundError``."""
    findings: list[LintFinding] = []
    files = 0
    env = _environment()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such template file or directory: {path}")
        found = (
            sorted(p for p in path.rglob("*") if p.suffix.lower() in TEMPLATE_SUFFIXES)
            if path.is_dir()
            else [path]
        )
        for file in found:
            files += 1
            try:
                source = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                findings.append(LintFinding(str(file), 1, f"cannot read the template: {exc}"))
                continue
            findings += lint_template(source, str(file), env)
    return findings, files


def lint_template(source: str, path: str, env: Environment | None = None) -> list[LintFinding]:
    """The findings for one template's ``source`` (``path`` names it in them)."""
    env = env or _environment()
    try:
        tokens = list(env.lex(source, path))
    except TemplateSyntaxError as exc:
        return [LintFinding(path, exc.lineno, f"cannot read the template: {exc.message}")]
    names = _experience_names(tokens)
    html = _HtmlState()
    findings: list[LintFinding] = []
    for lineno, kind, expression in _segments(tokens):
        if kind == "data":
            html.feed(expression)
            continue
        place = html.place_of_expression()
        if place is None:
            continue
        try:
            parsed = env.parse("{{ " + expression + " }}")
        except TemplateSyntaxError:
            continue  # Jinja itself reports it when the template is compiled
        for output in parsed.find_all(nodes.Output):
            for node in output.nodes:
                message = _judge(place, _Reads(names).of(node))
                if message:
                    findings.append(LintFinding(path, lineno, message))
    return findings


# -- Jinja tokens ----------------------------------------------------------------------------


def _environment() -> Environment:
    # Only lexes and parses (nothing renders), with Jinja's default delimiters.
    return Environment(autoescape=True)


def _segments(tokens: list[tuple[int, str, str]]) -> Iterator[tuple[int, str, str]]:
    """``(line, "data", text)`` for template text, ``(line, "expression", source)`` for
    each ``{{ ... }}``; block tags and comments produce nothing."""
    expression: list[str] | None = None
    start = 0
    for lineno, kind, value in tokens:
        if kind == "data":
            yield lineno, "data", value
        elif kind == "variable_begin":
            expression, start = [], lineno
        elif kind == "variable_end" and expression is not None:
            yield start, "expression", "".join(expression)
            expression = None
        elif expression is not None:
            expression.append(value)


def _experience_names(tokens: list[tuple[int, str, str]]) -> frozenset[str]:
    """Names bound to an experience anywhere in the template."""
    names: set[str] = set()
    block: list[tuple[str, str]] | None = None
    for _, kind, value in tokens:
        if kind == "block_begin":
            block = []
        elif kind == "block_end" and block is not None:
            names.update(_bound_in(block))
            block = None
        elif block is not None and kind != "whitespace":
            block.append((kind, value))
    return frozenset(names)


def _bound_in(block: list[tuple[str, str]]) -> Iterator[str]:
    if block[:1] == [("name", "experience")]:
        for i, token in enumerate(block[:-1]):
            if token == ("name", "as") and block[i + 1][0] == "name":
                yield block[i + 1][1]
    elif block[:1] in ([("name", "set")], [("name", "with")]) and (
        ("name", _HANDLE_FUNCTION) in block
    ):
        for i, token in enumerate(block[:-1]):
            if token[0] == "name" and block[i + 1] == ("operator", "="):
                yield token[1]


# -- payload reads in one expression ---------------------------------------------------------


class _Reads:
    """The payload reads of an expression, as ``"raw"`` / ``"url"`` / ``"scalar"`` /
    ``"json"`` (raw text under ``tojson``)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def of(self, node: nodes.Node, wrapper: str | None = None) -> list[str]:
        if isinstance(node, nodes.Filter) and node.name in _URL_FILTERS | {"tojson"}:
            wrapper = "url" if node.name in _URL_FILTERS else "json"
        kind = self._read_kind(node)
        if kind is not None:
            found = [wrapper if kind == "raw" and wrapper else kind]
            children: Iterable[nodes.Node] = self._arguments(node)
        else:
            found, children = [], node.iter_child_nodes()
        for child in children:
            found += self.of(child, wrapper)
        return found

    def _read_kind(self, node: nodes.Node) -> str | None:
        if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name):
            if node.node.name == _VALUE_FUNCTION:
                return "raw"
            if node.node.name == _URL_FUNCTION:
                return "url"
        if isinstance(node, nodes.Getattr) and self._is_experience(node.node):
            if node.attr in _READERS_URL:
                return "url"
            return "scalar" if node.attr in _READERS_SCALAR else "raw"
        if isinstance(node, nodes.Getitem) and self._is_experience(node.node):
            return "raw"
        return None

    def _arguments(self, node: nodes.Node) -> list[nodes.Node]:
        """What a read's own children hold besides the experience itself."""
        if isinstance(node, nodes.Getitem):
            return [node.arg]
        if isinstance(node, nodes.Call):
            return [*node.args, *(kw.value for kw in node.kwargs)]
        return []

    def _is_experience(self, node: nodes.Node) -> bool:
        if isinstance(node, nodes.Name):
            return node.name in self.names
        return (
            isinstance(node, nodes.Call)
            and isinstance(node.node, nodes.Name)
            and node.node.name == _HANDLE_FUNCTION
        )


def _judge(place: _Place, reads: list[str]) -> str | None:
    """The warning for ``reads`` at ``place``, if any."""
    context, name, quoted = place.context, place.name, place.quoted
    kinds = set(reads) - {"scalar"}
    if context != "script":
        # JSON text is only safe inside a script: in an attribute it is raw text.
        kinds = {"raw" if kind == "json" else kind for kind in kinds}
    if not kinds:
        return None
    if context == "script":
        if kinds == {"json"}:
            return None
        return "payload value inside <script>: pass it through | tojson"
    if context == "style":
        return "payload value inside <style>: never put payload values in CSS"
    if context == "tag":
        return (
            "payload value inside a tag, outside any attribute value: it can add "
            "attributes (event handlers); put it in a quoted attribute value"
        )
    if name.startswith("on") or name in CODE_ATTRIBUTES:
        what = "an event handler" if name.startswith("on") else "code"
        return (
            f"payload value in {name}= ({what}): never put payload values there, "
            "not even through url"
        )
    if "raw" not in kinds:
        return None  # URLs checked by url / safe_url
    if name in URL_ATTRIBUTES and not _ANCHORED_URL.match(place.prefix):
        return (
            f"payload value in {name}= without the url reader: escaping does not stop "
            'javascript: URLs; use .url("Name", "/default") or | safe_url'
        )
    if not quoted:
        return (
            f"payload value in an unquoted {name}= value: a space in it starts a new "
            "attribute; quote the attribute"
        )
    return None


# -- HTML, as far as attribute values are concerned ------------------------------------------


class _HtmlState:
    """A small HTML tokenizer (the HTML standard's states, simplified): fed the template
    text, it says what a ``{{ ... }}`` at the current position would be in."""

    _TAG_STATES = frozenset({"tag_name", "before_attribute", "attribute_name", "after_name"})

    def __init__(self) -> None:
        self.state = "data"
        self.tag = self.attribute = self.value = self.quote = self.buffer = ""

    def place_of_expression(self) -> _Place | None:
        """What a ``{{ ... }}`` here is in; ``None`` for text (autoescaping suffices)."""
        if self.state == "before_value":
            self.state, self.quote, self.value = "value", "", ""  # it starts an unquoted value
        if self.state == "value":
            place = _Place("attribute", self.attribute, bool(self.quote), self.value)
            self.value += "\0"  # what follows comes after something dynamic
            return place
        if self.state in self._TAG_STATES:
            return _Place("tag", self.tag, quoted=False)
        if self.state == "raw_text":
            return _Place(self.tag, self.tag)
        return None

    def feed(self, text: str) -> None:
        for char in text:
            self._step(char)

    def _step(self, char: str) -> None:  # one branch per tokenizer state
        state, space = self.state, char in _SPACE
        if state == "data":
            self.state = "open" if char == "<" else "data"
        elif state == "open":  # after "<"
            if char.isascii() and char.isalpha():
                self.state, self.tag = "tag_name", char.lower()
            elif char == "!":
                self.state, self.buffer = "bang", ""
            elif char != "<":
                self.state = "skip" if char in "/?" else "data"  # end tag, processing
        elif state == "bang":  # "<!": a comment, or a doctype / CDATA to skip
            self.buffer += char
            if self.buffer == "--":
                self.state, self.buffer = "comment", ""
            elif not "--".startswith(self.buffer):
                self.state = "data" if char == ">" else "skip"
        elif state == "comment":
            self.buffer = (self.buffer + char)[-3:]
            self.state = "data" if self.buffer == "-->" else "comment"
        elif state == "skip":
            self.state = "data" if char == ">" else "skip"
        elif char == ">" and state in self._TAG_STATES | {"before_value"}:
            self._end_of_tag()
        elif state == "tag_name":
            if space or char == "/":
                self.state = "before_attribute"
            else:
                self.tag += char.lower()
        elif state in ("before_attribute", "after_name"):
            if char == "=" and state == "after_name":
                self.state = "before_value"
            elif char == "/":
                self.state = "before_attribute"
            elif not space:
                self.state, self.attribute = "attribute_name", char.lower()
        elif state == "attribute_name":
            if space or char in "/=":
                self.state = {"/": "before_attribute", "=": "before_value"}.get(char, "after_name")
            else:
                self.attribute += char.lower()
        elif state == "before_value":
            if not space:
                quoted = char in "\"'"
                self.state, self.quote = "value", char if quoted else ""
                self.value = "" if quoted else char
        elif state == "value":
            if char == self.quote or (not self.quote and space):
                self.state = "before_attribute"
            elif not self.quote and char == ">":
                self._end_of_tag()
            else:
                self.value += char
        elif state == "raw_text":  # inside <script> / <style>, until its end tag
            closing = "</" + self.tag
            self.buffer = (self.buffer + char.lower())[-len(closing) :]
            if self.buffer == closing:
                self.state = "skip"

    def _end_of_tag(self) -> None:
        raw = self.tag in ("script", "style")
        self.state, self.buffer = ("raw_text" if raw else "data"), ""
