"""The whole mesh in one test process: five services on real gRPC ports (port 0), a real NATS
(the `nats_url` fixture), one real database per service (SQLite files, or PostgreSQL databases),
and the sandbox carrier as a real subprocess. Stubs for every service are ready to call.

A namespace per mesh keeps streams, consumers and the state bucket of one test from another's.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.billing.config import BillingSettings
from services.campaign.config import CampaignSettings
from services.execution.config import ExecutionSettings
from services.segment.config import SegmentSettings
from services.template.config import TemplateSettings
from shoal.bus import Bus
from shoal.grpc import GrpcServer, wait_healthy
from shoal.v1 import (
    billing_pb2_grpc,
    campaign_pb2_grpc,
    execution_pb2_grpc,
    segment_pb2_grpc,
    template_pb2_grpc,
)
from tests.processes import SandboxProcess, ServiceProcess

WORKSPACE = "ws_test"


@dataclass
class Mesh:
    workspace_id: str
    namespace: str
    sandbox: SandboxProcess
    servers: dict[str, GrpcServer] = field(default_factory=dict)
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    buses: list[Bus] = field(default_factory=list)
    segment: Any = None
    template: Any = None
    billing: Any = None
    campaign: Any = None
    execution: Any = None

    execution_process: ServiceProcess | None = None

    def address(self, name: str) -> str:
        if name == "execution" and self.execution_process is not None:
            return self.execution_process.address
        return self.servers[name].address


@asynccontextmanager
async def mesh(
    *,
    nats_url: str,
    tmp_path: Path,
    database_url: Callable[[str], str] | None = None,
    execution: dict[str, Any] | None = None,
    sandbox_env: dict[str, str] | None = None,
    execution_as_process: bool = False,
) -> AsyncIterator[Mesh]:
    """Start everything in dependency order; stop it all (reverse order) on exit."""
    from services.billing.server import build as build_billing
    from services.campaign.server import build as build_campaign
    from services.execution.server import build as build_execution
    from services.segment.server import build as build_segment
    from services.template.server import build as build_template

    namespace = f"m{uuid.uuid4().hex[:10]}"
    data = tmp_path / "mesh"
    data.mkdir(parents=True, exist_ok=True)
    sandbox = SandboxProcess(data / "sandbox", **(sandbox_env or {}))
    sandbox.data_dir.mkdir(parents=True, exist_ok=True)
    sandbox.start()
    m = Mesh(workspace_id=WORKSPACE, namespace=namespace, sandbox=sandbox)

    def db(name: str) -> str:
        return database_url(name) if database_url else f"sqlite:///{data / f'{name}.db'}"

    common: dict[str, Any] = {
        "port": 0,
        "nats_url": nats_url,
        "data_dir": data,
        "sandbox_url": sandbox.url,
        "log_json": False,
        "shutdown_grace_seconds": 1.0,
    }
    try:
        segment_bus = await Bus.connect(nats_url, name="segment", namespace=namespace)
        await segment_bus.ensure_streams()
        m.buses.append(segment_bus)
        starts = (
            (
                "segment",
                build_segment(SegmentSettings.load(**common, database_url=db("segment")), bus=segment_bus),
            ),
            ("template", build_template(TemplateSettings.load(**common, database_url=db("template")))),
            (
                "billing",
                build_billing(
                    BillingSettings.load(**common, database_url=db("billing")), namespace=namespace
                ),
            ),
        )
        for name, building in starts:
            server = await building
            await server.start()
            m.servers[name] = server
        peers = {
            "segment_addr": m.address("segment"),
            "template_addr": m.address("template"),
            "billing_addr": m.address("billing"),
        }
        exec_overrides = {
            "timer_interval_seconds": 0.1,
            "retry_backoff_seconds": 0.5,
            "fetch_timeout_seconds": 0.2,
            **(execution or {}),
        }
        if execution_as_process:
            # Its own process, so a test can kill -9 it and start it again on the same database.
            env = {f"SHOAL_EXECUTION_{k.upper()}": str(v) for k, v in exec_overrides.items()}
            env.update(
                SHOAL_NATS_URL=nats_url,
                SHOAL_NAMESPACE=namespace,
                SHOAL_SANDBOX_URL=sandbox.url,
                SHOAL_EXECUTION_DATABASE_URL=db("execution"),
                **{f"SHOAL_{k.upper()}": v for k, v in peers.items()},
            )
            m.execution_process = ServiceProcess("execution", data, **env)
            m.execution_process.start()
            await wait_healthy(m.execution_process.address, within=30)
        else:
            exec_settings = ExecutionSettings.load(
                **common, **peers, database_url=db("execution"), **exec_overrides
            )
            server = await build_execution(exec_settings, namespace=namespace)
            await server.start()
            m.servers["execution"] = server
        server = await build_campaign(
            CampaignSettings.load(
                **common,
                **peers,
                execution_addr=m.address("execution"),
                database_url=db("campaign"),
                scheduler_interval_seconds=0.2,
            ),
            namespace=namespace,
        )
        await server.start()
        m.servers["campaign"] = server
        stubs = {
            "segment": segment_pb2_grpc.SegmentServiceStub,
            "template": template_pb2_grpc.TemplateServiceStub,
            "billing": billing_pb2_grpc.BillingServiceStub,
            "campaign": campaign_pb2_grpc.CampaignServiceStub,
            "execution": execution_pb2_grpc.ExecutionServiceStub,
        }
        for name, stub in stubs.items():
            ch = grpc.aio.insecure_channel(m.address(name))
            m.channels.append(ch)
            setattr(m, name, stub(ch))
        yield m
    finally:
        for ch in m.channels:
            await ch.close()
        for name in ("campaign", "execution", "billing", "template", "segment"):
            if name in m.servers:
                await m.servers[name].stop(grace=1.0)
        for b in m.buses:
            await b.close()
        if m.execution_process is not None and m.execution_process.proc is not None:
            m.execution_process.terminate()
        sandbox.terminate()
