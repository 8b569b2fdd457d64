"""Observability: OpenTelemetry spans (extra ``[otel]``) and Prometheus metrics (extra
``[prometheus]``) behind the one ``Telemetry`` protocol of ``personalize_middleware._interfaces``.

Neither library is imported until an ``OpenTelemetry`` or ``PrometheusMetrics`` is
created. The parts that report (store, breaker, client, recorder, batcher) hold a
``telemetry`` attribute that is ``None`` unless ``PersonalizeMiddleware(telemetry=...)``
connected one, so without telemetry the hot path pays one attribute check.
"""

from __future__ import annotations

from ._otel import OpenTelemetry
from ._page import PageObserver, observe_page
from ._prometheus import PrometheusMetrics
from ._wiring import TelemetryArg, combine_telemetry, connect_telemetry

__all__ = [
    "OpenTelemetry",
    "PageObserver",
    "PrometheusMetrics",
    "TelemetryArg",
    "combine_telemetry",
    "connect_telemetry",
    "observe_page",
]
