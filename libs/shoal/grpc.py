"""gRPC server bootstrap and client channels, the same way in every service.

Server: grpc.aio, the standard health service (SERVING only after start), reflection, the
Prometheus request metrics (outermost, health checks excluded; `shoal.metrics`), the
OpenTelemetry server interceptor with health checks filtered out, and an interceptor that turns
domain errors into rich statuses. With `metrics_port` set, `/metrics` is served on that port.
Shutdown order on SIGTERM/SIGINT: health NOT_SERVING first (so balancers stop sending), then
`server.stop(grace)` (in-flight calls finish), then the service's own closers (workers, NATS
drain, database), then the metrics endpoint.

Client: one channel per peer with the OpenTelemetry client interceptors, a default deadline on
every call, and automatic retries on UNAVAILABLE for the methods a service declares idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters

from shoal import metrics as shoal_metrics
from shoal.errors import InvalidArgument, ShoalError, to_status

log = logging.getLogger(__name__)

# 64 MiB: a RenderBatch or HoldBatch of a few thousand items fits; anything larger is refused.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 1),
]

Closer = Callable[[], Awaitable[None]]
Registrar = Callable[[Any, grpc.aio.Server], None]


@dataclass(frozen=True)
class ServiceBinding:
    """One servicer to register: `add_XServicer_to_server`, the servicer, its full name."""

    register: Registrar
    servicer: Any
    full_name: str


@dataclass(frozen=True)
class _Undecodable:
    """What a request that is not valid protobuf for its method becomes (see `_decoding`)."""

    reason: str


def _decoding(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` that turns bytes it cannot decode (bad UTF-8 in a string, nesting beyond the
    decoder's limit, garbage) into `_Undecodable`, so the call answers INVALID_ARGUMENT instead of
    grpcio's UNKNOWN with the exception's text."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(str(exc).split(": ", 1)[-1])

    return decode


def _undecodable(request: Any) -> InvalidArgument | None:
    if isinstance(request, _Undecodable):
        return InvalidArgument.of("request", f"is not a valid protobuf message ({request.reason})")
    return None


class _DomainErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Answer domain errors with their status; never leak a stack trace to a caller; refuse a
    request that cannot be decoded with INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if refused := _undecodable(request):
                        raise refused
                    return await inner_uu(request, context)
                except ShoalError as exc:
                    await context.abort_with_status(to_status(exc))
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception:
                    log.exception("unhandled error in %s", method)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _decoding(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if refused := _undecodable(request):
                        raise refused
                    async for item in inner_us(request, context):
                        yield item
                except ShoalError as exc:
                    await context.abort_with_status(to_status(exc))
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception:
                    log.exception("unhandled error in %s", method)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _decoding(handler.request_deserializer), handler.response_serializer
            )
        return handler


@dataclass
class GrpcServer:
    """A started-or-not grpc.aio server with health and reflection."""

    name: str
    bindings: Sequence[ServiceBinding]
    host: str = "127.0.0.1"
    port: int = 0
    closers: list[Closer] = field(default_factory=list)
    server: grpc.aio.Server | None = None
    health: HealthServicer | None = None
    bound_port: int = 0
    # None: no /metrics endpoint; 0: a free port (see `metrics_endpoint.bound_port`).
    metrics_port: int | None = None
    # The registry the request metrics go to; None means the process's `shoal.metrics.default()`.
    metrics: shoal_metrics.Metrics | None = None
    metrics_endpoint: shoal_metrics.MetricsEndpoint | None = None

    async def start(self) -> int:
        self.health = HealthServicer()
        if self.metrics is None:
            self.metrics = shoal_metrics.default()
        self.server = grpc.aio.server(
            interceptors=[
                # Outermost: times the whole call and sees the status the caller gets.
                shoal_metrics.GrpcMetricsInterceptor(self.metrics),
                aio_server_interceptor(filter_=filters.negate(filters.health_check())),  # type: ignore[no-untyped-call]
                _DomainErrorInterceptor(),
            ],
            options=_CHANNEL_OPTIONS,
        )
        for binding in self.bindings:
            binding.register(binding.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [b.full_name for b in self.bindings]
        reflection.enable_server_reflection(
            [*names, reflection.SERVICE_NAME, "grpc.health.v1.Health"], self.server
        )
        self.bound_port = self.server.add_insecure_port(f"{self.host}:{self.port}")
        if self.bound_port == 0:
            raise RuntimeError(f"{self.name}: could not bind {self.host}:{self.port}")
        if self.metrics_port is not None:
            # Before the server starts: a metrics port already taken stops start-up cleanly.
            endpoint = shoal_metrics.MetricsEndpoint(self.metrics, self.host, self.metrics_port)
            try:
                endpoint.start()
            except OSError as exc:
                raise RuntimeError(
                    f"{self.name}: could not serve metrics on {self.host}:{self.metrics_port}: {exc}"
                ) from exc
            self.metrics_endpoint = endpoint
        await self.server.start()
        # SERVING only once the server really accepts calls.
        for svc in [*names, ""]:
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s serving on %s:%d", self.name, self.host, self.bound_port)
        return self.bound_port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.bound_port}"

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, then stop accepting and let in-flight calls finish, then the closers."""
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:
                log.exception("%s: error while closing", self.name)
        if self.metrics_endpoint is not None:
            # Last: a scrape during shutdown still answers.
            self.metrics_endpoint.stop()
            self.metrics_endpoint = None
        log.info("%s stopped", self.name)


async def serve_until_signal(
    server: GrpcServer, *, grace: float = 5.0, ready: Callable[[int], None] | None = None
) -> None:
    """Start, run until SIGTERM or SIGINT, then shut down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    if ready is not None:
        ready(port)
    await stop.wait()
    log.info("%s: shutdown requested", server.name)
    await server.stop(grace)


def retry_service_config(services: Iterable[str], idempotent_methods: Iterable[str]) -> str:
    """Service config retrying UNAVAILABLE with backoff, only for idempotent methods."""
    names = [{"service": svc, "method": m} for svc in services for m in idempotent_methods]
    config: dict[str, Any] = {
        "methodConfig": [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    return json.dumps(config)


class _DefaultDeadline(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Give every call a deadline unless the caller chose one: nothing waits forever."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def _with_deadline(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if details.timeout is not None:
            return details
        return grpc.aio.ClientCallDetails(
            details.method, self.seconds, details.metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_deadline(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_deadline(details), request)


def channel(
    address: str,
    *,
    deadline: float = 10.0,
    service: str | None = None,
    idempotent_methods: Sequence[str] = (),
) -> grpc.aio.Channel:
    """A client channel to `address` with tracing, a default deadline and safe retries."""
    options: list[tuple[str, Any]] = list(_CHANNEL_OPTIONS)
    if service and idempotent_methods:
        options.append(("grpc.service_config", retry_service_config([service], idempotent_methods)))
    interceptors: list[Any] = [*aio_client_interceptors(), _DefaultDeadline(deadline)]  # type: ignore[no-untyped-call]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


async def wait_healthy(address: str, *, within: float = 30.0, service: str = "") -> None:
    """Poll the standard health check until SERVING, or raise TimeoutError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() >= deadline:
                raise TimeoutError(f"{address} not SERVING after {within:.0f}s")
            await asyncio.sleep(0.1)


def run_service(
    name: str,
    build: Callable[[Any], Awaitable[GrpcServer]],
    settings: Any,
    *,
    port_file: str | None = None,
) -> None:
    """The entry point of every service process: telemetry, build, serve until a signal."""
    import os

    from shoal import telemetry

    telemetry.init(
        name,
        sample_ratio=settings.trace_sample_ratio,
        log_level=settings.log_level,
        log_json=settings.log_json,
    )

    def announce(port: int) -> None:
        # The runner learns ports chosen by the OS (port 0) from this file.
        target = port_file or os.environ.get("SHOAL_PORT_FILE")
        if target:
            Path(target).write_text(str(port))

    async def main() -> None:
        server = await build(settings)
        # SHOAL_<SERVICE>_METRICS_PORT; the services' build functions need not know about it.
        if server.metrics_port is None:
            server.metrics_port = getattr(settings, "metrics_port", None)
        await serve_until_signal(server, grace=settings.shutdown_grace_seconds, ready=announce)

    asyncio.run(main())
