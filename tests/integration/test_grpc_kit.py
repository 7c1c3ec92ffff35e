"""The gRPC kit on real servers: domain errors as rich statuses, health, reflection, deadlines,
retries of idempotent calls only, and graceful shutdown in the right order."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shoal.errors import FieldViolation, InvalidArgument, NotFound, Unavailable, from_rpc_error
from shoal.grpc import GrpcServer, ServiceBinding, channel, wait_healthy
from shoal.natsserver import NatsServer
from shoal.v1 import template_pb2 as tpb
from shoal.v1 import template_pb2_grpc
from tests.helpers import wait_for
from tests.processes import REPO

SERVICE = "shoal.v1.TemplateService"


class Probe(template_pb2_grpc.TemplateServiceServicer):
    """A servicer whose behaviour each test picks through the template id it asks for."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def GetTemplate(self, request: tpb.GetTemplateRequest, context: Any) -> tpb.GetTemplateResponse:
        self.calls[request.template_id] = self.calls.get(request.template_id, 0) + 1
        match request.template_id:
            case "invalid":
                raise InvalidArgument("bad input", violations=[FieldViolation("name", "is required")])
            case "missing":
                raise NotFound("template missing")
            case "crash":
                raise RuntimeError("secret internals /etc/passwd")
            case "slow":
                await asyncio.sleep(0.6)
            case "flaky" if self.calls["flaky"] < 3:
                raise Unavailable("try again")
        return tpb.GetTemplateResponse(template=tpb.Template(id=request.template_id))

    async def ListVersions(self, request: tpb.ListVersionsRequest, context: Any) -> tpb.ListVersionsResponse:
        self.calls["list"] = self.calls.get("list", 0) + 1
        raise Unavailable("try again")


@pytest.fixture
async def served() -> Any:
    probe = Probe()
    order: list[str] = []

    async def closer_a() -> None:
        order.append("a")

    async def closer_b() -> None:
        order.append("b")

    server = GrpcServer(
        "probe", [ServiceBinding(template_pb2_grpc.add_TemplateServiceServicer_to_server, probe, SERVICE)]
    )
    server.closers.extend([closer_a, closer_b])
    await server.start()
    yield server, probe, order
    await server.stop(grace=0.1)


async def test_domain_errors_carry_reason_and_violations(served: Any) -> None:
    server, _, _ = served
    async with channel(server.address) as ch:
        stub = template_pb2_grpc.TemplateServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetTemplate(tpb.GetTemplateRequest(template_id="invalid"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        domain = from_rpc_error(err.value)
        assert isinstance(domain, InvalidArgument)
        assert domain.reason == "validation_failed"
        assert domain.violations == [FieldViolation("name", "is required")]

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetTemplate(tpb.GetTemplateRequest(template_id="missing"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert isinstance(from_rpc_error(err.value), NotFound)


async def test_unexpected_error_is_internal_without_details(served: Any) -> None:
    server, _, _ = served
    async with channel(server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await template_pb2_grpc.TemplateServiceStub(ch).GetTemplate(
                tpb.GetTemplateRequest(template_id="crash")
            )
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error"
    assert "passwd" not in str(err.value)


async def test_health_and_reflection(served: Any) -> None:
    server, _, _ = served
    async with grpc.aio.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = [
            r
            async for r in refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        ]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_default_deadline(served: Any) -> None:
    server, _, _ = served
    async with channel(server.address, deadline=0.2) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await template_pb2_grpc.TemplateServiceStub(ch).GetTemplate(
                tpb.GetTemplateRequest(template_id="slow")
            )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_only_idempotent_methods_are_retried(served: Any) -> None:
    server, probe, _ = served
    async with channel(server.address, service=SERVICE, idempotent_methods=["GetTemplate"]) as ch:
        stub = template_pb2_grpc.TemplateServiceStub(ch)
        reply = await stub.GetTemplate(tpb.GetTemplateRequest(template_id="flaky"))
        assert reply.template.id == "flaky"
        assert probe.calls["flaky"] == 3
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListVersions(tpb.ListVersionsRequest(template_id="x"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert probe.calls["list"] == 1


async def test_graceful_stop_finishes_in_flight_calls_then_closes(served: Any) -> None:
    server, probe, order = served
    async with channel(server.address) as ch:
        stub = template_pb2_grpc.TemplateServiceStub(ch)
        in_flight = asyncio.ensure_future(stub.GetTemplate(tpb.GetTemplateRequest(template_id="slow")))
        await wait_for(lambda: probe.calls.get("slow") == 1, timeout=5)
        stopping = asyncio.ensure_future(server.stop(grace=5.0))
        reply = await in_flight
        assert reply.template.id == "slow"
        await stopping
    # Closers run after the server stopped, last registered first.
    assert order == ["b", "a"]
    with pytest.raises(TimeoutError):
        await wait_healthy(server.address, within=0.3)


def test_service_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "nats") as nats:
        port_file = tmp_path / "port"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")},
            "SHOAL_NATS_URL": nats.url,
            "SHOAL_DATA_DIR": str(tmp_path),
            "SHOAL_BILLING_PORT": "0",
            "SHOAL_PORT_FILE": str(port_file),
        }
        log = tmp_path / "billing.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.billing"], cwd=REPO, env=env, stdout=out, stderr=out
            )
        try:
            port = _wait_port(port_file, proc)
            asyncio.run(wait_healthy(f"127.0.0.1:{port}", within=20))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert text.index("shutdown requested") < text.index("billing stopped")


def _wait_port(port_file: Path, proc: subprocess.Popen[bytes]) -> int:
    from tests.processes import wait_until

    def ready() -> int | None:
        assert proc.poll() is None, "service exited early"
        return int(port_file.read_text()) if port_file.exists() and port_file.read_text() else None

    return wait_until(ready, timeout=30, what="the port file")
