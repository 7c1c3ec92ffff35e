"""Tracing of REST requests: FastAPI's native OpenTelemetry support, configured for Shoal.

FastAPI (0.165+) opens a SERVER span per request itself when opentelemetry-api is importable,
continuing the caller's W3C `traceparent` through the global propagator that `shoal.telemetry`
installs. The span is current while the handler runs, so the gRPC client interceptor makes every
call to a service its child and one trace goes from the caller through the mesh. A middleware of
our own on top would only duplicate that span, so this module just shapes the configuration.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from fastapi.telemetry import TelemetryConfig
from opentelemetry.trace import TracerProvider

# Probes run every few seconds; a span each would bury the traces anyone looks for.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz"})


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS


def telemetry_config(tracer_provider: TracerProvider | None = None) -> TelemetryConfig:
    """FastAPI's telemetry settings: request spans yes, probes no, exporters ours."""
    return {
        # None: the global provider set by `shoal.telemetry.init` (service.name, OTLP exporter).
        "tracer_provider": tracer_provider,
        "tracing": True,
        # Per-dependency/endpoint INTERNAL spans would double every request's span count for
        # little insight; the hops worth seeing are the gRPC calls, traced by their interceptor.
        "operation_spans": False,
        # Exporters come from `shoal.telemetry`, never from a second, implicit set-up.
        "auto_configure": False,
        # No OTel logger provider is configured: our logs are JSON lines with trace ids already.
        "logs": False,
        "exclude": _untraced,
    }
