"""A real OTLP/gRPC trace receiver for tests and benchmarks: what Jaeger would receive, in memory.

`OtlpCollector` is a grpc.aio server on a free port implementing the collector's
`TraceService/Export`. Point a process at it with `OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint`
(the SDK's own OTLP exporter, batch processor and all) and every span it exports is stored as a
`ReceivedSpan`: ids in lower-case hex as Jaeger shows them, name, kind, attributes, links and the
resource's `service.name`. `wait_for_spans` polls (bounded) until spans matching a predicate have
arrived; `tree` builds the parent/child tree of one trace. With `keep=False` it only counts
spans, for benchmarks that measure the exporting side's cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

_KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, kind)


def _attributes(kvs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class ReceivedLink:
    trace_id: str
    span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span. Ids are lower-case hex; `parent_span_id` is "" for a root."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    service: str
    attributes: dict[str, Any]
    links: tuple[ReceivedLink, ...]
    start_ns: int
    end_ns: int
    status: str

    def __str__(self) -> str:
        return f"{self.service}: {self.name} [{self.kind}]"


@dataclass
class TraceTree:
    """The spans of one trace, by id, with their children in start order."""

    trace_id: str
    spans: dict[str, ReceivedSpan]
    children: dict[str, list[ReceivedSpan]]

    @classmethod
    def of(cls, trace_id: str, spans: Iterable[ReceivedSpan]) -> TraceTree:
        by_id = {s.span_id: s for s in spans if s.trace_id == trace_id}
        children: dict[str, list[ReceivedSpan]] = {}
        for s in sorted(by_id.values(), key=lambda x: x.start_ns):
            children.setdefault(s.parent_span_id, []).append(s)
        return cls(trace_id, by_id, children)

    @property
    def roots(self) -> list[ReceivedSpan]:
        """Spans whose parent is not in the trace (the caller's span lives outside it)."""
        return [s for s in self.spans.values() if s.parent_span_id not in self.spans]

    def parent(self, span: ReceivedSpan) -> ReceivedSpan | None:
        return self.spans.get(span.parent_span_id)

    def ancestors(self, span: ReceivedSpan) -> list[ReceivedSpan]:
        """Parent first, up to the root; stops at a parent that did not arrive (a broken link)."""
        out: list[ReceivedSpan] = []
        current = self.parent(span)
        while current is not None:
            out.append(current)
            current = self.parent(current)
        return out

    def descendants(self, span: ReceivedSpan) -> Iterator[ReceivedSpan]:
        for child in self.children.get(span.span_id, []):
            yield child
            yield from self.descendants(child)

    def render(self) -> str:
        """An indented `service: name [KIND]` tree, for assertion messages."""
        lines: list[str] = []

        def walk(s: ReceivedSpan, depth: int) -> None:
            lines.append(f"{'  ' * depth}{s}")
            for c in self.children.get(s.span_id, []):
                walk(c, depth + 1)

        for root in sorted(self.roots, key=lambda x: x.start_ns):
            walk(root, 0)
        return "\n".join(lines)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: OtlpCollector) -> None:
        self.collector = collector

    async def Export(  # the gRPC method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.collector.receive(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpCollector:
    """An OTLP/gRPC trace receiver on 127.0.0.1 and a free port; use as `async with`."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.count = 0
        self.requests = 0
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_ENDPOINT (plain-text gRPC)."""
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment that makes a Shoal process export here, quickly."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    async def start(self) -> None:
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0.5)
            self._server = None

    async def __aenter__(self) -> OtlpCollector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        self.requests += 1
        for rs in request.resource_spans:
            if not self.keep:
                self.count += sum(len(ss.spans) for ss in rs.scope_spans)
                continue
            service = str(_attributes(rs.resource.attributes).get("service.name", ""))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.count += 1
                    self.spans.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=_KINDS.get(s.kind, str(s.kind)),
                            service=service,
                            attributes=_attributes(s.attributes),
                            links=tuple(
                                ReceivedLink(
                                    link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes)
                                )
                                for link in s.links
                            ),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            status=trace_pb2.Status.StatusCode.Name(s.status.code),
                        )
                    )

    # -- queries ---------------------------------------------------------------------------------

    def find(self, predicate: Callable[[ReceivedSpan], bool]) -> list[ReceivedSpan]:
        return [s for s in self.spans if predicate(s)]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def tree(self, trace_id: str) -> TraceTree:
        return TraceTree.of(trace_id, self.spans)

    def by_id(self, span_id: str) -> ReceivedSpan | None:
        return next((s for s in self.spans if s.span_id == span_id), None)

    async def wait_for_spans(
        self,
        predicate: Callable[[ReceivedSpan], bool],
        *,
        count: int = 1,
        timeout: float = 10.0,
        what: str = "",
    ) -> list[ReceivedSpan]:
        """Poll until at least `count` received spans match; return them all (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(predicate)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                names = sorted({str(s) for s in self.spans})
                raise AssertionError(
                    f"{len(found)} of {count} spans {what or 'matching'} after {timeout}s; "
                    f"{len(self.spans)} received: {names}"
                )
            await asyncio.sleep(0.05)
