"""``PrometheusMetrics``: the middleware's health as Prometheus metrics.

Names (with the default ``namespace="personalize"``) and labels:

==============================================  ==========================================
metric                                          labels
==============================================  ==========================================
``personalize_upstream_request_duration_seconds``  ``endpoint`` (fetch / metadata / events),
(histogram)                                     ``outcome`` (ok, timeout, unavailable,
                                                rate_limited, unauthorized, bad_request,
                                                malformed, cancelled, error)
``personalize_cache_results_total``             ``source`` (hit, stale, miss, coalesced,
                                                shared, shed, fallback)
``personalize_fetch_denied_total``              ``reason`` (circuit_open, budget)
``personalize_circuit_breaker_state`` (gauge)   ``state`` (closed, open, half-open): how many
                                                live processes are in each state
``personalize_circuit_breaker_transitions_total``  ``state`` entered
``personalize_events_total``                    ``outcome`` (accepted, queued, sent, retried,
                                                dropped_overflow, dropped_rejected,
                                                dropped_failed, dropped_shutdown, ...)
``personalize_events_outbox_depth`` (gauge)     events waiting for delivery, summed over
                                                live processes (the batcher's queue; an
                                                outbox reports here too)
``personalize_page_keys_total``                 ``reason`` (cached, stale, targeting_match,
                                                default, error, disabled): what each page
                                                got for each key
==============================================  ==========================================

Multiprocess mode (gunicorn): with ``PROMETHEUS_MULTIPROC_DIR`` set before the workers
start, every worker writes its values there; gauges sum over live processes
(``multiprocess_mode="livesum"``, so gunicorn's ``child_exit`` hook must call
``prometheus_client.multiprocess.mark_process_dead(worker.pid)``), and ``asgi_app()`` /
``scrape_registry()`` read all workers' files. ``prometheus_client`` is imported when a
``PrometheusMetrics`` is created, never before (the extra ``[prometheus]``).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from .._interfaces import KeyOutcome, PageTrace, Telemetry, TrackedEvent
from ._errors import call_outcome, denial_reason, missing_extra, short_endpoint

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DEFAULT_BUCKETS", "DEFAULT_NAMESPACE", "PrometheusMetrics"]

#: Seconds; dense around the default latency budget (0.15 s).
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_NAMESPACE = "personalize"
BREAKER_STATES = ("closed", "open", "half-open")


class _Families:
    """The metric objects of one namespace in one registry (created once: a registry
    refuses a second metric of the same name)."""

    def __init__(self, registry: CollectorRegistry, ns: str, buckets: Sequence[float]) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.upstream: Histogram = Histogram(
            "upstream_request_duration_seconds",
            "Seconds per HTTP call to MoEngage Personalize, by endpoint and outcome",
            ["endpoint", "outcome"],
            namespace=ns,
            buckets=buckets,
            registry=registry,
        )
        self.cache: Counter = Counter(
            "cache_results",
            "Experience keys looked up or fetched, by where the answer came from",
            ["source"],
            namespace=ns,
            registry=registry,
        )
        self.denied: Counter = Counter(
            "fetch_denied",
            "Fetches not made: circuit open / calls paused, or the workspace budget spent",
            ["reason"],
            namespace=ns,
            registry=registry,
        )
        self.breaker: Gauge = Gauge(
            "circuit_breaker_state",
            "Processes whose circuit breaker is in each state",
            ["state"],
            namespace=ns,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.transitions: Counter = Counter(
            "circuit_breaker_transitions",
            "Circuit breaker state changes, by the state entered",
            ["state"],
            namespace=ns,
            registry=registry,
        )
        self.events: Counter = Counter(
            "events",
            "Impressions and clicks, by outcome (accepted, queued, sent, retried, dropped_*)",
            ["outcome"],
            namespace=ns,
            registry=registry,
        )
        self.outbox: Gauge = Gauge(
            "events_outbox_depth",
            "Events waiting for delivery to MoEngage (queued or being sent)",
            namespace=ns,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.pages: Counter = Counter(
            "page_keys",
            "Experience keys of pages, by what the page got (feature_flag.result.reason)",
            ["reason"],
            namespace=ns,
            registry=registry,
        )


_REGISTERED: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Families]] = (
    weakref.WeakKeyDictionary()
)


class PrometheusMetrics(Telemetry):
    """Prometheus metrics of the middleware (``pip install
    'personalize-middleware[prometheus]'``)::

        metrics = PrometheusMetrics()
        app.add_middleware(PersonalizeMiddleware, ..., telemetry=metrics)
        app.mount("/metrics", metrics.asgi_app())

    ``registry`` defaults to ``prometheus_client.REGISTRY``; instances sharing a registry
    and ``namespace`` share the metrics. ``page_outcomes=False`` leaves out
    ``personalize_page_keys_total`` (and its small per-page cost). Raises
    ``ConfigurationError`` when ``prometheus_client`` is not installed.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        page_outcomes: bool = True,
    ) -> None:
        try:
            import prometheus_client
        except ImportError as exc:
            raise missing_extra("PrometheusMetrics()", "prometheus_client", "prometheus") from exc
        self.registry: CollectorRegistry = (
            prometheus_client.REGISTRY if registry is None else registry
        )
        self.namespace = namespace
        per_registry = _REGISTERED.setdefault(self.registry, {})
        families = per_registry.get(namespace)
        if families is None:
            families = per_registry[namespace] = _Families(self.registry, namespace, buckets)
        self._m = families
        self._page_outcomes = page_outcomes
        self._breaker_state: str | None = None
        # Label children resolved once: .labels() costs a lock and a dict lookup per call.
        self._cache_sources = _Children(families.cache)
        self._event_outcomes = _Children(families.events)
        self._page_reasons = _Children(families.pages)

    def __repr__(self) -> str:
        return f"PrometheusMetrics(namespace={self.namespace!r}, multiprocess={self.multiprocess})"

    @property
    def multiprocess(self) -> bool:
        """True when ``prometheus_client`` runs in multiprocess mode (the environment
        variable ``PROMETHEUS_MULTIPROC_DIR`` was set when it was imported)."""
        from prometheus_client import values

        return bool(values.ValueClass.__name__ != "MutexValue")

    def scrape_registry(self) -> CollectorRegistry:
        """The registry to expose: in multiprocess mode a registry reading every process's
        files, else the one the metrics live in."""
        if not self.multiprocess:
            return self.registry
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry

    def asgi_app(self) -> Any:
        """An ASGI app serving the metrics (mount it at ``/metrics``)."""
        from prometheus_client import make_asgi_app

        return make_asgi_app(self.scrape_registry())

    # -- Telemetry -------------------------------------------------------------------------

    def page_started(self, keys: tuple[str, ...]) -> PageTrace | None:
        return _PageCounts(self._page_reasons) if self._page_outcomes else None

    def upstream_call_finished(
        self,
        call: object,
        endpoint: str,
        seconds: float,
        status: int | None,
        error: BaseException | None,
    ) -> None:
        self._m.upstream.labels(short_endpoint(endpoint), call_outcome(error)).observe(seconds)

    def cache_result(self, source: str, count: int) -> None:
        self._cache_sources[source].inc(count)

    def fetch_failed(self, error: BaseException) -> None:
        reason = denial_reason(error)
        if reason is not None:
            self._m.denied.labels(reason).inc()

    def breaker_changed(self, state: str) -> None:
        previous, self._breaker_state = self._breaker_state, state
        if previous == state:
            return
        if previous is not None:
            self._m.breaker.labels(previous).dec()
            self._m.transitions.labels(state).inc()
        else:
            for other in BREAKER_STATES:
                self._m.breaker.labels(other)  # every state shows, at 0 when not current
        self._m.breaker.labels(state).inc()

    def event_accepted(self, event: TrackedEvent) -> None:
        self.events_counted("accepted", 1)

    def events_counted(self, outcome: str, count: int) -> None:
        self._event_outcomes[outcome].inc(count)

    def outbox_depth(self, depth: int) -> None:
        self._m.outbox.set(depth)


class _Children(dict[str, Any]):
    """A labelled counter's children by label value, resolved once each."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self._counter = counter

    def __missing__(self, label: str) -> Any:
        child = self[label] = self._counter.labels(label)
        return child


class _PageCounts:
    __slots__ = ("_reasons",)

    def __init__(self, reasons: _Children) -> None:
        self._reasons = reasons

    def activate(self) -> AbstractContextManager[object]:
        return nullcontext()

    def finish(self, outcomes: Mapping[str, KeyOutcome]) -> None:
        counts: dict[str, int] = {}
        for outcome in outcomes.values():
            counts[outcome.reason] = counts.get(outcome.reason, 0) + 1
        for reason, count in counts.items():  # one locked increment per reason
            self._reasons[reason].inc(count)
