"""``OpenTelemetry``: spans for MoEngage calls and for each page's personalization.

=============================  ==============================================================
span                           what it carries
=============================  ==============================================================
``personalize.page``           one per page view that asked for experiences: from the
                               request's start to the handle's wait completing or the
                               response starting; ``personalize.keys``; one event
                               ``feature_flag.evaluation`` per key with ``feature_flag.key``,
                               ``feature_flag.provider.name`` (``moengage``),
                               ``feature_flag.result.reason`` and
                               ``feature_flag.result.variant`` (the ``moe_variation_id``)
``POST /experiences/fetch``    one per HTTP call to MoEngage (kind CLIENT; ``GET
(and metadata, events)``       /experiences/metadata``, ``POST /experiences/events``), a
                               child of the page whose fetch started it;
                               ``http.request.method``, ``http.response.status_code``,
                               ``error.type`` and an ERROR status when it failed
=============================  ==============================================================

Each accepted impression or click becomes an event ``personalize.impression`` /
``personalize.click`` (``feature_flag.key``, ``feature_flag.result.variant``, ``b_id``) on
the current span (the beacon request's server span), or on a ``personalize.event`` span
when nothing is recording. ``opentelemetry`` is imported when an ``OpenTelemetry`` is
created, never before (the extra ``[otel]``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from .._interfaces import KeyOutcome, PageTrace, Telemetry, TrackedEvent
from .._version import __version__
from ._errors import call_outcome, missing_extra, short_endpoint

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = ["PROVIDER_NAME", "OpenTelemetry"]

#: ``feature_flag.provider.name`` of every evaluation.
PROVIDER_NAME = "moengage"
PAGE_SPAN = "personalize.page"
EVALUATION_EVENT = "feature_flag.evaluation"

_KEY = "feature_flag.key"
_PROVIDER = "feature_flag.provider.name"
_REASON = "feature_flag.result.reason"
_VARIANT = "feature_flag.result.variant"


class OpenTelemetry(Telemetry):
    """Traces personalization with OpenTelemetry (``pip install
    'personalize-middleware[otel]'``)::

        PersonalizeMiddleware(app, ..., telemetry=OpenTelemetry())

    ``tracer_provider`` defaults to the global one (``opentelemetry.trace``); spans go
    wherever the app's SDK exports them. Raises ``ConfigurationError`` when
    ``opentelemetry-api`` is not installed.
    """

    def __init__(self, *, tracer_provider: TracerProvider | None = None) -> None:
        try:
            from opentelemetry import context, trace
        except ImportError as exc:
            raise missing_extra("OpenTelemetry()", "opentelemetry-api", "otel") from exc
        self._context = context
        self._trace = trace
        self.tracer: Tracer = trace.get_tracer(
            "personalize_middleware", __version__, tracer_provider=tracer_provider
        )
        self._client = trace.SpanKind.CLIENT

    def __repr__(self) -> str:
        return "OpenTelemetry()"

    # -- pages -----------------------------------------------------------------------------

    def page_started(self, keys: tuple[str, ...]) -> PageTrace | None:
        return _PageSpan(self, time.time_ns())

    # -- upstream calls ----------------------------------------------------------------------

    def upstream_call_started(self, endpoint: str) -> object:
        method = endpoint.partition(" ")[0]
        span = self.tracer.start_span(
            endpoint,
            kind=self._client,
            attributes={
                "http.request.method": method,
                "personalize.endpoint": short_endpoint(endpoint),
                _PROVIDER: PROVIDER_NAME,
            },
        )
        # Current while the call runs: an httpx instrumentation nests under it.
        token = self._context.attach(self._trace.set_span_in_context(span))
        return span, token

    def upstream_call_finished(
        self,
        call: object,
        endpoint: str,
        seconds: float,
        status: int | None,
        error: BaseException | None,
    ) -> None:
        if not isinstance(call, tuple):
            return
        span, token = call
        self._context.detach(token)
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_attribute("personalize.outcome", call_outcome(error))
            # Messages of the APIError tree never carry the secret (redacted at the client).
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)[:300]))
        span.end()

    # -- tracking ----------------------------------------------------------------------------

    def event_accepted(self, event: TrackedEvent) -> None:
        kind = "click" if event.kind == "clicked" else "impression"
        attributes: dict[str, Any] = {
            _KEY: event.key,
            _PROVIDER: PROVIDER_NAME,
            "personalize.event.kind": kind,
        }
        variant = event.context.get("moe_variation_id")
        if variant is not None:
            attributes[_VARIANT] = str(variant)
        if event.b_id is not None:
            attributes["personalize.event.b_id"] = event.b_id
        current = self._trace.get_current_span()
        if current.is_recording():
            current.add_event("personalize." + kind, attributes)
            return
        span = self.tracer.start_span("personalize.event")
        span.add_event("personalize." + kind, attributes)
        span.end()


class _PageSpan:
    """The ``personalize.page`` span of one page view, started when it is first needed
    (with the request's start as its start time)."""

    __slots__ = ("_owner", "_span", "_started_ns")

    def __init__(self, owner: OpenTelemetry, started_ns: int) -> None:
        self._owner = owner
        self._started_ns = started_ns
        self._span: Span | None = None

    def _ensure(self) -> Span:
        if self._span is None:
            self._span = self._owner.tracer.start_span(PAGE_SPAN, start_time=self._started_ns)
        return self._span

    def activate(self) -> AbstractContextManager[object]:
        # Fetch tasks started meanwhile copy the context: their calls are the page's children.
        span = self._ensure()
        cm: AbstractContextManager[object] = self._owner._trace.use_span(span, end_on_exit=False)
        return cm

    def finish(self, outcomes: Mapping[str, KeyOutcome]) -> None:
        if self._span is None and not outcomes:
            return  # a page that asked for nothing: no span
        span = self._ensure()
        if not span.is_recording():  # not sampled: nothing to write
            span.end()
            return
        span.set_attribute("personalize.keys", list(outcomes))
        for key, outcome in outcomes.items():
            attributes: dict[str, Any] = {
                _KEY: key,
                _PROVIDER: PROVIDER_NAME,
                _REASON: outcome.reason,
            }
            experience = outcome.experience
            if experience is not None:
                variant = experience.variation_id
                if variant is not None:
                    attributes[_VARIANT] = variant
            span.add_event(EVALUATION_EVENT, attributes)
        span.end()
