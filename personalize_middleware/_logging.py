"""Rate-limited logging: one line per kind of trouble per interval, with a count."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Logs a message of a given ``kind`` at most once per ``interval`` seconds, then
    reports how many were suppressed. Keeps a busy site's logs readable in an outage."""

    __slots__ = ("_last", "_logger", "_suppressed", "interval")

    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self._logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def _should_log(self, kind: str) -> tuple[bool, int]:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False, 0
        self._last[kind] = now
        if len(self._last) > 256:  # kinds are code-defined; bound it anyway
            self._last.clear()
        return True, self._suppressed.pop(kind, 0)

    def _log(self, level: int, kind: str, msg: str, args: tuple[Any, ...], **kw: Any) -> None:
        if not self._logger.isEnabledFor(level):
            return
        ok, suppressed = self._should_log(kind)
        if not ok:
            return
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self._logger.log(level, msg, *args, **kw)

    def debug(self, kind: str, msg: str, *args: Any) -> None:
        self._log(logging.DEBUG, kind, msg, args)

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        self._log(logging.WARNING, kind, msg, args)

    def error(self, kind: str, msg: str, *args: Any) -> None:
        self._log(logging.ERROR, kind, msg, args)

    def exception(self, kind: str, msg: str, *args: Any, exc_info: BaseException) -> None:
        self._log(logging.ERROR, kind, msg, args, exc_info=exc_info)
