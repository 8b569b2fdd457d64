"""Turning the ``telemetry=`` argument into one ``Telemetry`` and handing it to the parts.

``combine_telemetry`` validates what the app passed (one object or a list) and returns a
fan-out that calls each in turn and keeps an exception in one of them from reaching the
request (it is logged, rate-limited). ``connect_telemetry`` gives it to the store, the
breaker, the HTTP client and tracking's recorder and batcher: each holds ``telemetry``
(``None`` by default) and checks that one attribute before reporting anything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigurationError
from .._interfaces import KeyOutcome, PageTrace, Telemetry, TrackedEvent
from .._logging import RateLimitedLog
from ..upstream import PersonalizeClient

if TYPE_CHECKING:
    from .._interfaces import PersonalizeBackend
    from ..cache import ExperienceStore
    from ..tracking import Tracking

__all__ = ["TelemetryArg", "combine_telemetry", "connect_telemetry"]

logger = logging.getLogger("personalize_middleware.telemetry")

#: What ``PersonalizeMiddleware(telemetry=...)`` takes.
TelemetryArg = Telemetry | Sequence[Telemetry] | None

_METHODS = (
    "page_started",
    "upstream_call_started",
    "upstream_call_finished",
    "cache_result",
    "fetch_failed",
    "breaker_changed",
    "event_accepted",
    "events_counted",
    "outbox_depth",
)


def combine_telemetry(telemetry: TelemetryArg) -> Telemetry | None:
    """One ``Telemetry`` for ``telemetry`` (an object or a sequence); ``None`` when empty.
    Raises ``ConfigurationError`` for anything that is not a telemetry object."""
    if telemetry is None:
        return None
    items: list[Any] = list(telemetry) if isinstance(telemetry, list | tuple) else [telemetry]
    for item in items:
        if isinstance(item, type):
            raise ConfigurationError(
                f"telemetry: pass an instance ({item.__name__}()), not the class",
                field="telemetry",
            )
        missing = [name for name in _METHODS if not callable(getattr(item, name, None))]
        if missing:
            raise ConfigurationError(
                f"telemetry: {type(item).__name__} is not a Telemetry (no {', '.join(missing)}); "
                "use OpenTelemetry(), PrometheusMetrics() or a Telemetry subclass",
                field="telemetry",
            )
    return _Fanout(items) if items else None


def connect_telemetry(
    telemetry: TelemetryArg,
    store: ExperienceStore,
    backend: PersonalizeBackend,
    tracking: Tracking | None,
) -> Telemetry | None:
    """Combine ``telemetry`` (``combine_telemetry``) and give it to every part that
    reports to it; ``None`` when there is none. A part shared with another middleware
    reports to the one connected last."""
    combined = combine_telemetry(telemetry)
    if combined is None:
        return None
    store.telemetry = combined
    store.breaker.telemetry = combined
    combined.breaker_changed(store.breaker.state)
    inner = getattr(backend, "backend", backend)  # the report's counting wrapper
    for candidate in (backend, inner):
        if isinstance(candidate, PersonalizeClient):
            candidate.telemetry = combined
    if tracking is not None:
        tracking.recorder.telemetry = combined
        tracking.batcher.telemetry = combined
        combined.outbox_depth(tracking.batcher.pending)
    return combined


class _Fanout:
    """Calls every telemetry in turn; what one raises is logged and goes no further."""

    __slots__ = ("_items", "_log")

    def __init__(self, items: list[Telemetry]) -> None:
        self._items = tuple(items)
        self._log = RateLimitedLog(logger)

    def __repr__(self) -> str:
        return f"Telemetry({', '.join(type(i).__name__ for i in self._items)})"

    def _failed(self, item: object, method: str, exc: Exception) -> None:
        self._log.exception(
            f"{type(item).__name__}.{method}",
            "personalize: telemetry %s.%s failed; ignored",
            type(item).__name__,
            method,
            exc_info=exc,
        )

    def _each(self, method: str, *args: Any) -> None:
        for item in self._items:
            try:
                getattr(item, method)(*args)
            except Exception as exc:
                self._failed(item, method, exc)

    def page_started(self, keys: tuple[str, ...]) -> PageTrace | None:
        traces: list[PageTrace] = []
        for item in self._items:
            try:
                trace = item.page_started(keys)
            except Exception as exc:
                self._failed(item, "page_started", exc)
                continue
            if trace is not None:
                traces.append(trace)
        return _FanoutTrace(self, traces) if traces else None

    def upstream_call_started(self, endpoint: str) -> object:
        calls: list[object] = []
        for item in self._items:
            try:
                calls.append(item.upstream_call_started(endpoint))
            except Exception as exc:
                self._failed(item, "upstream_call_started", exc)
                calls.append(None)
        return calls

    def upstream_call_finished(
        self,
        call: object,
        endpoint: str,
        seconds: float,
        status: int | None,
        error: BaseException | None,
    ) -> None:
        calls = call if isinstance(call, list) else [None] * len(self._items)
        for item, one in zip(self._items, calls, strict=False):
            try:
                item.upstream_call_finished(one, endpoint, seconds, status, error)
            except Exception as exc:
                self._failed(item, "upstream_call_finished", exc)

    def cache_result(self, source: str, count: int) -> None:
        if count:
            self._each("cache_result", source, count)

    def fetch_failed(self, error: BaseException) -> None:
        self._each("fetch_failed", error)

    def breaker_changed(self, state: str) -> None:
        self._each("breaker_changed", state)

    def event_accepted(self, event: TrackedEvent) -> None:
        self._each("event_accepted", event)

    def events_counted(self, outcome: str, count: int) -> None:
        if count:
            self._each("events_counted", outcome, count)

    def outbox_depth(self, depth: int) -> None:
        self._each("outbox_depth", depth)


class _FanoutTrace:
    __slots__ = ("_owner", "_traces")

    def __init__(self, owner: _Fanout, traces: list[PageTrace]) -> None:
        self._owner = owner
        self._traces = traces

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for trace in self._traces:
                try:
                    stack.enter_context(trace.activate())
                except Exception as exc:
                    self._owner._failed(trace, "activate", exc)
            yield

    def activate(self) -> AbstractContextManager[object]:
        if len(self._traces) == 1:
            try:
                return self._traces[0].activate()
            except Exception as exc:
                self._owner._failed(self._traces[0], "activate", exc)
                return contextlib.nullcontext()
        return self._active()

    def finish(self, outcomes: Mapping[str, KeyOutcome]) -> None:
        for trace in self._traces:
            try:
                trace.finish(outcomes)
            except Exception as exc:
                self._owner._failed(trace, "finish", exc)
