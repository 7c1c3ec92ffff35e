"""Prometheus metrics of one process: its registry, gRPC and HTTP request metrics, the domain
metrics of DESIGN §6, the JetStream consumer-lag poller and the `/metrics` endpoint.

Every process has one `Metrics` (`default()`), built on its own `CollectorRegistry` rather than
prometheus_client's global one, so a test can run several servers in one interpreter, each with a
registry of its own. Every metric a service may emit is declared here, with its labels, so names
and label sets live in one place (docs/operations.md lists them):

    grpc_server_handled_total{grpc_service,grpc_method,grpc_type,grpc_code}     counter
    grpc_server_handling_seconds{grpc_service,grpc_method,grpc_type,grpc_code}  histogram
    http_server_requests_total{method,route,status}                             counter
    http_server_request_duration_seconds{method,route,status}                   histogram
    shoal_executions_by_state{state}                                            gauge
    shoal_node_seconds{node_type}                                               histogram
    shoal_sends_total{channel,provider,outcome}                                 counter
    shoal_breaker_state{provider}                   gauge: 0 closed, 1 half-open, 2 open
    shoal_holds_total{outcome}                                                  counter
    shoal_consumer_lag{stream,consumer}             gauge: messages not yet delivered
    shoal_consumer_ack_pending{stream,consumer}     gauge: delivered, not yet acknowledged
    shoal_fanout_contacts_total                                                 counter

gRPC request metrics come from `GrpcMetricsInterceptor`, which `shoal.grpc.GrpcServer` installs
outermost (so the latency includes tracing and the domain-error mapping, and the code is the one
the caller sees). Health checks are not counted: balancers and kubelets poll them every few
seconds and they would drown the real traffic.

The endpoint is prometheus_client's WSGI server on a daemon thread (`MetricsEndpoint`): a scrape
does not queue behind the event loop's work (it still shares the GIL with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from shoal.flow import NODE_TYPES

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"

# Request latencies: a gRPC call is 1 ms to a few seconds (RenderBatch, HoldBatch of thousands).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One flow node over one batch of executions.
NODE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# The label values the domain helpers accept: a typo becomes an error in tests, not a new series.
# ExecutionState of execution.proto, lower case without the prefix (a WAIT is `pending` with a wake time).
EXECUTION_STATES = ("pending", "processing", "completed", "failed", "skipped")
SEND_OUTCOMES = (
    "accepted",  # the provider took it
    "duplicate",  # the provider already had it (same key): a retry after a crash
    "retryable",  # the provider refused this item for now; tried again after the backoff
    "failed",  # the provider refused this item for good
    "unavailable",  # the whole call failed (outage, timeout, breaker open); tried again later
)
HOLD_OUTCOMES = ("held", "captured", "insufficient_balance", "released")
BREAKER_STATES: Mapping[str, int] = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    """Every metric of one process, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        if process:
            # process_* (CPU, memory, open fds) and python_info: scraped per process anyway.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        r = self.registry
        grpc_labels = ("grpc_service", "grpc_method", "grpc_type", "grpc_code")
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "gRPC calls completed on the server, by method and status code (health checks excluded)",
            grpc_labels,
            registry=r,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from a gRPC call's arrival to its status, by method and status code",
            grpc_labels,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        http_labels = ("method", "route", "status")
        self.http_requests = Counter(
            "http_server_requests_total",
            "HTTP requests answered, by method, route template and status",
            http_labels,
            registry=r,
        )
        self.http_seconds = Histogram(
            "http_server_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status",
            http_labels,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.executions_by_state = Gauge(
            "shoal_executions_by_state",
            "Executions in each state (all runs), as last counted from the execution database",
            ("state",),
            registry=r,
        )
        self.node_seconds = Histogram(
            "shoal_node_seconds",
            "Time to run one flow node over one batch of executions",
            ("node_type",),
            buckets=NODE_BUCKETS,
            registry=r,
        )
        self.sends = Counter(
            "shoal_sends_total",
            "Messages handed to a provider, by channel, provider and outcome",
            ("channel", "provider", "outcome"),
            registry=r,
        )
        self.breaker_state = Gauge(
            "shoal_breaker_state",
            "Circuit breaker of each provider in this process: 0 closed, 1 half-open, 2 open",
            ("provider",),
            registry=r,
        )
        self.holds = Counter(
            "shoal_holds_total",
            "Billing holds answered by HoldBatch, by outcome",
            ("outcome",),
            registry=r,
        )
        self.consumer_lag = Gauge(
            "shoal_consumer_lag",
            "Messages in the stream not yet delivered to the durable consumer (JetStream num_pending)",
            ("stream", "consumer"),
            registry=r,
        )
        self.consumer_ack_pending = Gauge(
            "shoal_consumer_ack_pending",
            "Messages delivered to the durable consumer and not yet acknowledged (num_ack_pending)",
            ("stream", "consumer"),
            registry=r,
        )
        self.fanout_contacts = Counter(
            "shoal_fanout_contacts_total",
            "Contacts turned into executions by fan-outs",
            registry=r,
        )

    # -- helpers for the services (label values checked, so a typo fails a test) -----------------

    def set_executions_by_state(self, counts: Mapping[str, int]) -> None:
        """Publish a fresh count per state; a state absent from `counts` is set to 0."""
        for state in counts:
            _check(state, EXECUTION_STATES, "execution state")
        for state in EXECUTION_STATES:
            self.executions_by_state.labels(state=state).set(counts.get(state, 0))

    def observe_node(self, node_type: str, seconds: float) -> None:
        _check(node_type, NODE_TYPES, "node type")
        self.node_seconds.labels(node_type=node_type).observe(seconds)

    def record_sends(self, channel: str, provider: str, outcome: str, count: int = 1) -> None:
        _check(outcome, SEND_OUTCOMES, "send outcome")
        if count:
            self.sends.labels(channel=channel.upper(), provider=provider, outcome=outcome).inc(count)

    def set_breaker_state(self, provider: str, state: str) -> None:
        """`state` as services/execution/breaker.py names it: closed, half_open, open."""
        _check(state, tuple(BREAKER_STATES), "breaker state")
        self.breaker_state.labels(provider=provider).set(BREAKER_STATES[state])

    def record_holds(self, outcome: str, count: int = 1) -> None:
        _check(outcome, HOLD_OUTCOMES, "hold outcome")
        if count:
            self.holds.labels(outcome=outcome).inc(count)

    def record_fanout(self, contacts: int) -> None:
        if contacts:
            self.fanout_contacts.inc(contacts)

    def record_grpc(self, full_method: str, rpc_type: str, code: grpc.StatusCode, seconds: float) -> None:
        service, method = split_method(full_method)
        labels = {
            "grpc_service": service,
            "grpc_method": method,
            "grpc_type": rpc_type,
            "grpc_code": code.name,
        }
        self.grpc_handled.labels(**labels).inc()
        self.grpc_seconds.labels(**labels).observe(seconds)

    def record_http(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = {"method": method, "route": route, "status": str(status)}
        self.http_requests.labels(**labels).inc()
        self.http_seconds.labels(**labels).observe(seconds)


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}, expected one of {', '.join(allowed)}")


_default: Metrics | None = None
_default_lock = threading.Lock()


def default() -> Metrics:
    """The process's metrics (created on first use)."""
    global _default  # noqa: PLW0603  # one registry per process, by design
    with _default_lock:
        if _default is None:
            _default = Metrics()
        return _default


def split_method(full_method: str) -> tuple[str, str]:
    """`/shoal.v1.TemplateService/GetTemplate` -> (`shoal.v1.TemplateService`, `GetTemplate`)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service or "unknown"), method


# -- gRPC server interceptor -----------------------------------------------------------------------


def _status_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """The status the caller sees: what the handler (or an abort) set, else from how it ended."""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Count and time every call by method and status code, health checks excluded."""

    def __init__(self, metrics: Metrics, *, exclude_services: Iterable[str] = (HEALTH_SERVICE,)) -> None:
        self.metrics = metrics
        self._excluded = tuple(f"/{s}/" for s in exclude_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(self._excluded):
            return handler
        record = self.metrics.record_grpc

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                exc: BaseException | None = None
                try:
                    return await inner_uu(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    record(method, "unary", _status_of(context, exc), time.perf_counter() - start)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                start = time.perf_counter()
                exc: BaseException | None = None
                try:
                    async for item in inner_us(request, context):
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    record(method, "server_stream", _status_of(context, exc), time.perf_counter() - start)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                exc: BaseException | None = None
                try:
                    return await inner_su(requests, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    record(method, "client_stream", _status_of(context, exc), time.perf_counter() - start)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                start = time.perf_counter()
                exc: BaseException | None = None
                try:
                    async for item in inner_ss(requests, context):
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    record(method, "bidi_stream", _status_of(context, exc), time.perf_counter() - start)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


# -- HTTP (ASGI) middleware, for the gateway and the sandbox ---------------------------------------

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class HttpMetricsMiddleware:
    """Pure ASGI middleware: count and time each HTTP request by method, route template, status.

    The route label is the matched route's template (`/v1/campaigns/{campaign_id}`, set by
    Starlette/FastAPI routing in `scope["route"]`), never the raw path, so ids do not become
    series; unmatched requests are labelled `unmatched`. `skip_paths` (probes) are not counted.
    """

    def __init__(
        self, app: AsgiApp, metrics: Metrics | None = None, *, skip_paths: Iterable[str] = ("/healthz",)
    ) -> None:
        self.app = app
        self.metrics = metrics or default()
        self.skip = frozenset(skip_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.skip:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.record_http(str(scope.get("method", "")), route, status, time.perf_counter() - start)


# -- JetStream consumer lag --------------------------------------------------------------------------


class ConsumerInfoSource(Protocol):
    """What the poller needs from `shoal.bus.Bus`."""

    async def consumer_info(self, stream: str, durable: str) -> Any: ...


@dataclass
class ConsumerLagPoller:
    """Poll JetStream consumer info and publish `shoal_consumer_lag` and `_ack_pending`.

    Labels carry the stream's real (namespaced) name, as JetStream reports it, and the durable.
    A failed poll (NATS restarting) keeps the last values and is tried again next interval.
    """

    source: ConsumerInfoSource
    consumers: Sequence[tuple[str, str]]
    metrics: Metrics = field(default_factory=default)
    interval: float = 15.0

    async def poll_once(self) -> None:
        for stream, durable in self.consumers:
            try:
                info = await self.source.consumer_info(stream, durable)
            except Exception as exc:
                log.debug("consumer info %s/%s failed: %r", stream, durable, exc)
                continue
            labels = {"stream": str(getattr(info, "stream_name", None) or stream), "consumer": durable}
            self.metrics.consumer_lag.labels(**labels).set(int(info.num_pending or 0))
            self.metrics.consumer_ack_pending.labels(**labels).set(int(info.num_ack_pending or 0))

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `interval` seconds until `stop` is set."""
        while not stop.is_set():
            await self.poll_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)


# -- the /metrics endpoint ---------------------------------------------------------------------------


@dataclass
class MetricsEndpoint:
    """`GET /metrics` (any path, in fact) on host:port, served from a daemon thread."""

    metrics: Metrics
    host: str = "127.0.0.1"
    port: int = 0
    bound_port: int = 0
    _server: WSGIServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> int:
        self._server, self._thread = start_http_server(
            self.port, addr=self.host, registry=self.metrics.registry
        )
        self.bound_port = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", self.host, self.bound_port)
        return self.bound_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.bound_port}/metrics"
