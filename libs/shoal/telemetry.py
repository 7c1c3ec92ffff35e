"""One TracerProvider per process, W3C propagation, and JSON log lines that carry trace ids.

`init(service_name)` is called once by each process's entry point. Tests pass their own
`SpanExporter` (an InMemorySpanExporter) to assert span trees.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# Attribute names of DESIGN §6, in one place so spans and tests agree.
ATTR_CAMPAIGN_ID = "shoal.campaign.id"
ATTR_RUN_ID = "shoal.run.id"
ATTR_EXECUTION_ID = "shoal.execution.id"
ATTR_CONTACT_ID = "shoal.contact.id"
ATTR_NODE_ID = "shoal.node.id"
ATTR_NODE_TYPE = "shoal.node.type"
ATTR_WORKSPACE_ID = "shoal.workspace.id"

propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]))


def init(
    service_name: str,
    *,
    exporter: SpanExporter | None = None,
    sample_ratio: float = 1.0,
    log_level: str = "INFO",
    log_json: bool = True,
) -> TracerProvider:
    """Install the process's TracerProvider and logging.

    The OTLP exporter is used when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; an explicit `exporter`
    (tests) is exported synchronously so assertions see spans as soon as they end.

    Sampling is parent-based: a trace started here is sampled with `sample_ratio`, one continued
    from a caller or a message follows the caller's decision. With no exporter at all, traces
    started here are not sampled: nothing would receive the spans, and recording them costs CPU
    (bench/engine.py, docs/operations.md). Trace ids still propagate and reach the log lines.
    """
    exporting = exporter is not None or bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    root: Sampler = TraceIdRatioBased(sample_ratio) if exporting else ALWAYS_OFF
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(root),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    # set_tracer_provider only takes the first provider of a process; tests build several mesh
    # processes in one interpreter, so pass the provider explicitly where it matters.
    trace.set_tracer_provider(provider)
    configure_logging(service_name, level=log_level, json_lines=log_json)
    return provider


def inject(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    propagate.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids when a span is active."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service_name,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
            entry["span_id"] = format(ctx.span_id, "016x")
        for key, value in getattr(record, "__dict__", {}).items():
            if key.startswith("shoal_"):
                entry[key.removeprefix("shoal_")] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service_name: str, *, level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(service_name))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service_name} %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
