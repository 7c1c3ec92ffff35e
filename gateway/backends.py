"""The gateway's clients: one gRPC channel per service it calls and the NATS bus, opened in the
app's lifespan.

Channels are created inside the running event loop (grpc.aio binds a channel to the loop that
first uses it) and closed on shutdown, so no call outlives the app. The bus connects on first
use (only provider callbacks publish), so the REST API does not depend on NATS being up.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
from fastapi import Request

from gateway.config import GatewaySettings
from shoal.bus import Bus
from shoal.grpc import channel
from shoal.v1 import (
    billing_pb2,
    billing_pb2_grpc,
    campaign_pb2,
    campaign_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    segment_pb2,
    segment_pb2_grpc,
    template_pb2,
    template_pb2_grpc,
)

CAMPAIGN_SERVICE = campaign_pb2.DESCRIPTOR.services_by_name["CampaignService"].full_name
EXECUTION_SERVICE = execution_pb2.DESCRIPTOR.services_by_name["ExecutionService"].full_name
SEGMENT_SERVICE = segment_pb2.DESCRIPTOR.services_by_name["SegmentService"].full_name
TEMPLATE_SERVICE = template_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name
BILLING_SERVICE = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name
# Reads only: retrying them on UNAVAILABLE can never do a thing twice.
CAMPAIGN_IDEMPOTENT = (
    "GetCampaign",
    "ListCampaigns",
    "GetCampaignStatus",
    "ListRuns",
    "ListTransitions",
    "ValidateCampaign",
    "EstimateCampaign",
)
EXECUTION_IDEMPOTENT = ("GetExecution", "ListExecutions", "GetRunCounts", "ListSends", "GetRunFunnel")
SEGMENT_IDEMPOTENT = (
    "GetContact",
    "ListContacts",
    "ListConsent",
    "GetSegment",
    "ListSegments",
    "EstimateAudience",
)
TEMPLATE_IDEMPOTENT = ("GetTemplate", "ListTemplates", "ListVersions", "Preview")
BILLING_IDEMPOTENT = ("GetBalance", "ListPrices", "EstimateCost", "GetAutoReload", "ListLedger")


@dataclass
class Backends:
    settings: GatewaySettings
    # Health checks go over a plain channel: no trace per probe, no retries hiding an outage.
    campaign_health_channel: grpc.aio.Channel
    campaigns: campaign_pb2_grpc.CampaignServiceStub
    executions: execution_pb2_grpc.ExecutionServiceStub
    segments: segment_pb2_grpc.SegmentServiceStub
    templates: template_pb2_grpc.TemplateServiceStub
    billing: billing_pb2_grpc.BillingServiceStub
    # Every channel above, closed with the app.
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    _bus: Bus | None = None
    _bus_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def open(cls, settings: GatewaySettings) -> Backends:
        channels: list[grpc.aio.Channel] = []

        def to(address: str, service: str, idempotent: tuple[str, ...]) -> grpc.aio.Channel:
            made = channel(
                address,
                deadline=settings.grpc_deadline_seconds,
                service=service,
                idempotent_methods=idempotent,
            )
            channels.append(made)
            return made

        health = grpc.aio.insecure_channel(settings.campaign_addr)
        channels.append(health)
        return cls(
            settings=settings,
            campaign_health_channel=health,
            campaigns=campaign_pb2_grpc.CampaignServiceStub(
                to(settings.campaign_addr, CAMPAIGN_SERVICE, CAMPAIGN_IDEMPOTENT)
            ),
            executions=execution_pb2_grpc.ExecutionServiceStub(
                to(settings.execution_addr, EXECUTION_SERVICE, EXECUTION_IDEMPOTENT)
            ),
            segments=segment_pb2_grpc.SegmentServiceStub(
                to(settings.segment_addr, SEGMENT_SERVICE, SEGMENT_IDEMPOTENT)
            ),
            templates=template_pb2_grpc.TemplateServiceStub(
                to(settings.template_addr, TEMPLATE_SERVICE, TEMPLATE_IDEMPOTENT)
            ),
            billing=billing_pb2_grpc.BillingServiceStub(
                to(settings.billing_addr, BILLING_SERVICE, BILLING_IDEMPOTENT)
            ),
            channels=channels,
        )

    async def bus(self) -> Bus:
        """The NATS bus, connected on first use (raises when NATS cannot be reached)."""
        async with self._bus_lock:
            if self._bus is None:
                self._bus = await Bus.connect(
                    self.settings.nats_url, name="gateway", namespace=self.settings.namespace
                )
            return self._bus

    async def close(self) -> None:
        if self._bus is not None:
            await self._bus.close()
        for opened in self.channels:
            await opened.close()


async def get_backends(request: Request) -> Backends:
    # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop per request.
    backends: Backends = request.app.state.backends
    return backends
