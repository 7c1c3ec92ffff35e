"""gRPC request metrics on a real GrpcServer, scraped from its real /metrics endpoint; consumer lag
from a real JetStream consumer."""

from __future__ import annotations

import re
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shoal.bus import STREAM_EXEC, Bus
from shoal.errors import NotFound
from shoal.grpc import GrpcServer, ServiceBinding, channel
from shoal.metrics import ConsumerLagPoller, Metrics
from shoal.v1 import events_pb2, template_pb2_grpc
from shoal.v1 import template_pb2 as tpb

SERVICE = "shoal.v1.TemplateService"


class Probe(template_pb2_grpc.TemplateServiceServicer):
    async def GetTemplate(self, request: tpb.GetTemplateRequest, context: Any) -> tpb.GetTemplateResponse:
        if request.template_id == "missing":
            raise NotFound("template missing")
        if request.template_id == "crash":
            raise RuntimeError("boom")
        return tpb.GetTemplateResponse(template=tpb.Template(id=request.template_id))


@pytest.fixture
async def served() -> Any:
    metrics = Metrics()
    server = GrpcServer(
        "probe",
        [ServiceBinding(template_pb2_grpc.add_TemplateServiceServicer_to_server, Probe(), SERVICE)],
        metrics=metrics,
        metrics_port=0,
    )
    await server.start()
    yield server
    await server.stop(grace=0.1)


async def scrape(server: GrpcServer) -> str:
    assert server.metrics_endpoint is not None
    async with httpx.AsyncClient() as client:
        reply = await client.get(server.metrics_endpoint.url, timeout=5)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return reply.text


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample `name{labels}` in exposition text (labels in any order)."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    return None


def grpc_labels(method: str, code: str) -> dict[str, str]:
    return {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": "unary", "grpc_code": code}


async def test_calls_are_counted_and_timed_by_method_and_code_health_checks_are_not(served: Any) -> None:
    server: GrpcServer = served
    async with channel(server.address) as ch:
        stub = template_pb2_grpc.TemplateServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(3):
            await health.Check(health_pb2.HealthCheckRequest(service=""))
        before = await scrape(server)
        assert value(before, "grpc_server_handled_total", **grpc_labels("GetTemplate", "OK")) is None

        await stub.GetTemplate(tpb.GetTemplateRequest(workspace_id="ws", template_id="t1"))
        await stub.GetTemplate(tpb.GetTemplateRequest(workspace_id="ws", template_id="t2"))
        for tid, code in (("missing", grpc.StatusCode.NOT_FOUND), ("crash", grpc.StatusCode.INTERNAL)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetTemplate(tpb.GetTemplateRequest(workspace_id="ws", template_id=tid))
            assert err.value.code() == code
        await health.Check(health_pb2.HealthCheckRequest(service=""))

    text = await scrape(server)
    ok = grpc_labels("GetTemplate", "OK")
    assert value(text, "grpc_server_handled_total", **ok) == 2
    assert value(text, "grpc_server_handled_total", **grpc_labels("GetTemplate", "NOT_FOUND")) == 1
    assert value(text, "grpc_server_handled_total", **grpc_labels("GetTemplate", "INTERNAL")) == 1
    assert value(text, "grpc_server_handling_seconds_count", **ok) == 2
    total = value(text, "grpc_server_handling_seconds_sum", **ok)
    assert total is not None
    assert 0 < total < 5
    assert value(text, "grpc_server_handling_seconds_bucket", **ok, le="+Inf") == 2
    # Every call of a test server on loopback answers well within 5 s.
    assert value(text, "grpc_server_handling_seconds_bucket", **ok, le="5.0") == 2
    # Health checks (4 of them) are not counted; the process collectors are there.
    assert "grpc.health.v1.Health" not in text
    assert "process_cpu_seconds_total" in text


async def test_the_endpoint_closes_with_the_server() -> None:
    server = GrpcServer(
        "probe",
        [ServiceBinding(template_pb2_grpc.add_TemplateServiceServicer_to_server, Probe(), SERVICE)],
        metrics=Metrics(process=False),
        metrics_port=0,
    )
    await server.start()
    assert server.metrics_endpoint is not None
    url = server.metrics_endpoint.url
    await server.stop(grace=0.1)
    assert server.metrics_endpoint is None
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(url, timeout=2)


async def test_no_endpoint_unless_asked() -> None:
    server = GrpcServer(
        "probe",
        [ServiceBinding(template_pb2_grpc.add_TemplateServiceServicer_to_server, Probe(), SERVICE)],
        metrics=Metrics(process=False),
    )
    await server.start()
    try:
        assert server.metrics_endpoint is None
    finally:
        await server.stop(grace=0.1)


async def test_a_taken_metrics_port_stops_start_up_with_its_name() -> None:
    first = GrpcServer(
        "probe",
        [ServiceBinding(template_pb2_grpc.add_TemplateServiceServicer_to_server, Probe(), SERVICE)],
        metrics=Metrics(process=False),
        metrics_port=0,
    )
    await first.start()
    try:
        assert first.metrics_endpoint is not None
        second = GrpcServer(
            "probe2",
            [ServiceBinding(template_pb2_grpc.add_TemplateServiceServicer_to_server, Probe(), SERVICE)],
            metrics=Metrics(process=False),
            metrics_port=first.metrics_endpoint.bound_port,
        )
        with pytest.raises(RuntimeError, match=r"probe2: could not serve metrics on 127\.0\.0\.1:\d+"):
            await second.start()
    finally:
        await first.stop(grace=0.1)


async def test_consumer_lag_is_read_from_a_real_jetstream_consumer(bus: Bus) -> None:
    metrics = Metrics(process=False)
    await bus.ensure_consumer(STREAM_EXEC, "lag-probe", filter_subjects=[bus.step_subject("c1")])
    poller = ConsumerLagPoller(bus, [(STREAM_EXEC, "lag-probe")], metrics=metrics)
    labels = {"stream": bus.stream_name(STREAM_EXEC), "consumer": "lag-probe"}

    await poller.poll_once()
    assert metrics.registry.get_sample_value("shoal_consumer_lag", labels) == 0
    for n in range(3):
        await bus.publish(bus.step_subject("c1"), events_pb2.StepMessage(), msg_id=f"m{n}")
    await poller.poll_once()
    assert metrics.registry.get_sample_value("shoal_consumer_lag", labels) == 3
    assert metrics.registry.get_sample_value("shoal_consumer_ack_pending", labels) == 0

    sub = await bus.js.pull_subscribe_bind(durable="lag-probe", stream=bus.stream_name(STREAM_EXEC))
    (msg,) = await sub.fetch(1, timeout=5)
    await poller.poll_once()
    assert metrics.registry.get_sample_value("shoal_consumer_lag", labels) == 2
    assert metrics.registry.get_sample_value("shoal_consumer_ack_pending", labels) == 1
    await msg.ack()
    await sub.unsubscribe()
