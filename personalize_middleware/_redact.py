"""Keeping the API secret out of what we say: exception messages, tracebacks, log lines.

Text that comes from outside (an error body, a header, an httpx or h11 message) may
repeat the credentials: a careless proxy echoes the request, an error page quotes the
``Authorization`` header, a protocol error quotes the bad header line. Two defences, both
applied by the client to every piece of outside text:

- ``Redactor.redact`` replaces every form of the secret we know of: as is, URL-encoded
  (``quote``, ``quote_plus``, twice), base64 (the ``workspace:secret`` Basic token, and
  the secret alone at each of the three byte alignments, standard and URL-safe
  alphabets, plain or URL-encoded), and **any run of 8 or more characters** of any of
  those forms, so a truncated echo, a prefix or a suffix is caught too. Matching ignores
  ASCII case (``%2f`` and ``%2F``; base64 is matched the same way: a false positive only
  costs a few characters of an error message).
- ``Redactor.snippet`` makes outside text a short single line (``SNIPPET_LIMIT``
  characters), drops control, format and surrogate characters (which could also hide a
  secret from the matching above), then redacts it.

``protect_library_logs`` puts a filter on httpx's and httpcore's loggers: httpcore logs
whole response headers at DEBUG and httpx the status line's reason phrase at INFO, both
written by the far end. Filters run only for records a logger emits, so nothing is spent
unless those loggers are enabled.
"""

from __future__ import annotations

import base64
import logging
import threading
import traceback
import unicodedata
import weakref
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

__all__ = [
    "MIN_WINDOW",
    "REDACTED",
    "SNIPPET_LIMIT",
    "Redactor",
    "protect_library_logs",
    "secret_forms",
]

#: What a redacted run of text becomes.
REDACTED = "********"
#: Runs of this many characters of any form of a secret are redacted wherever they are.
MIN_WINDOW = 8
#: The most characters of outside text an exception message carries, per field.
SNIPPET_LIMIT = 200

#: Loggers whose records carry text written by the far end (see the module docstring).
LIBRARY_LOGGERS = (
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)

_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_URLSAFE = str.maketrans("+/", "-_")
# Control, format (zero-width, bidi overrides), surrogate, line / paragraph separators.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _url_forms(text: str) -> list[str]:
    once = quote(text, safe="")
    return [text, once, quote(text), quote_plus(text), quote(once, safe="")]


def _base64_cores(data: bytes) -> list[str]:
    """The base64 text of ``data`` as it appears inside ANY longer base64 text, whatever
    the bytes around it: one form per byte alignment, without the 4-character groups that
    also encode neighbouring bytes."""
    cores: list[str] = []
    for offset in range(3):
        padded = b"\0" * offset + data
        encoded = base64.b64encode(padded).decode("ascii")
        core = encoded[4 if offset else 0 : len(padded) // 3 * 4]
        if core:
            cores += [core, core.translate(_URLSAFE)]
    return cores


def secret_forms(api_secret: str, workspace_id: str | None = None) -> list[str]:
    """Every form of ``api_secret`` that ``Redactor`` looks for (each also as any run of
    ``MIN_WINDOW`` or more characters)."""
    forms = _url_forms(api_secret)
    encoded: list[str] = _base64_cores(api_secret.encode())
    if workspace_id is not None:
        token = base64.b64encode(f"{workspace_id}:{api_secret}".encode()).decode("ascii")
        encoded += [token, token.translate(_URLSAFE)]
    for text in encoded:
        forms += _url_forms(text)
    return list(dict.fromkeys(form for form in forms if form))


class Redactor:
    """Finds and replaces the forms of one or more secrets in text (see the module
    docstring). Immutable once built; safe to share between threads."""

    __slots__ = ("__weakref__", "_windows")

    def __init__(self, forms: Iterable[str]) -> None:
        by_width: dict[int, set[str]] = {}
        for form in forms:
            width = min(MIN_WINDOW, len(form))
            if width == 0:
                continue
            folded = form.translate(_FOLD)
            windows = by_width.setdefault(width, set())
            windows.update(folded[i : i + width] for i in range(len(folded) - width + 1))
        self._windows = tuple((width, frozenset(w)) for width, w in sorted(by_width.items()))

    @classmethod
    def for_credentials(cls, workspace_id: str, api_secret: str) -> Redactor:
        """A redactor for the API secret and the Basic token built from both."""
        return cls(secret_forms(api_secret, workspace_id))

    def __repr__(self) -> str:
        return f"<Redactor of {sum(len(w) for _, w in self._windows)} windows>"

    def _runs(self, text: str) -> list[tuple[int, int]]:
        """Merged (start, end) runs of ``text`` covered by some window."""
        folded = text.translate(_FOLD)
        spans: list[tuple[int, int]] = []
        for width, windows in self._windows:
            spans += [
                (start, start + width)
                for start in range(len(folded) - width + 1)
                if folded[start : start + width] in windows
            ]
        spans.sort()
        runs: list[tuple[int, int]] = []
        for start, end in spans:
            if runs and start <= runs[-1][1]:
                runs[-1] = (runs[-1][0], max(end, runs[-1][1]))
            else:
                runs.append((start, end))
        return runs

    def leaks(self, text: str) -> bool:
        """True when ``text`` holds any form (or run of 8+ characters of one)."""
        return bool(self._runs(text))

    def redact(self, text: str) -> str:
        """``text`` with every run of a secret's forms replaced by ``REDACTED``."""
        runs = self._runs(text)
        if not runs:
            return text
        parts: list[str] = []
        position = 0
        for start, end in runs:
            parts += [text[position:start], REDACTED]
            position = end
        parts.append(text[position:])
        return "".join(parts)

    def snippet(self, text: str, limit: int = SNIPPET_LIMIT) -> str:
        """Outside text fit for a message: one line of printable characters, redacted,
        at most ``limit`` characters (``...`` marks a cut)."""
        # Redacted before and after the clean-up: a form may hold whitespace, and a
        # dropped character may have split a form.
        printable = "".join(
            " " if char.isspace() else char
            for char in self.redact(text[: limit * 4])
            if char.isspace() or unicodedata.category(char) not in _DROPPED_CATEGORIES
        )
        clean = self.redact(" ".join(printable.split()))
        if len(clean) > limit:
            clean = clean[: max(0, limit - 3)].rstrip() + "..."
        return clean

    def scrub_exception(self, exc: BaseException) -> bool:
        """Redact, in place, the messages of ``exc`` and of every exception it was raised
        from or during (``__cause__`` / ``__context__``, and exceptions held in ``args``).
        True when the formatted traceback is then clean; False means a message lives
        somewhere ``args`` do not reach (the caller must not chain ``exc``)."""
        pending: list[BaseException] = [exc]
        seen: set[int] = set()
        while pending:
            current = pending.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            current.args = tuple(self._clean_arg(arg, pending) for arg in current.args)
            notes = getattr(current, "__notes__", None)
            if isinstance(notes, list):
                notes[:] = [self.redact(n) if isinstance(n, str) else n for n in notes]
            pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        try:
            shown = "".join(traceback.format_exception(exc))
        except Exception:  # a __str__ that fails: better not chain it at all
            return False
        return not self.leaks(shown)

    def _clean_arg(self, arg: object, pending: list[BaseException]) -> object:
        if isinstance(arg, str):
            return self.redact(arg)
        if isinstance(arg, BaseException):
            pending.append(arg)
            return arg
        if arg is None or isinstance(arg, int | float):
            return arg
        shown = repr(arg)
        return self.redact(shown) if self.leaks(shown) else arg


class _RedactingFilter(logging.Filter):
    """Rewrites a record's message when it holds a live redactor's secret."""

    def __init__(self) -> None:
        super().__init__()
        self._redactors: weakref.WeakSet[Redactor] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, redactor: Redactor) -> None:
        with self._lock:
            self._redactors.add(redactor)

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            redactors = tuple(self._redactors)
        if not redactors:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken record: logging reports it, with its own text
            return True
        clean = message
        for redactor in redactors:
            clean = redactor.redact(clean)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_LOG_FILTER = _RedactingFilter()
_install_lock = threading.Lock()


def protect_library_logs(redactor: Redactor) -> None:
    """Redact ``redactor``'s secret from httpx's and httpcore's log records for as long
    as ``redactor`` lives (the client holding it keeps it alive)."""
    with _install_lock:
        for name in LIBRARY_LOGGERS:
            log = logging.getLogger(name)
            if _LOG_FILTER not in log.filters:
                log.addFilter(_LOG_FILTER)
    _LOG_FILTER.add(redactor)
