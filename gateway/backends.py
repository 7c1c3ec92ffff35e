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
    campaign_channel: grpc.aio.Channel
    # Health checks go over a plain channel: no trace per probe, no retries hiding an outage.
    campaign_health_channel: grpc.aio.Channel
    campaigns: campaign_pb2_grpc.CampaignServiceStub
    execution_channel: grpc.aio.Channel
    executions: execution_pb2_grpc.ExecutionServiceStub
    segment_channel: grpc.aio.Channel
    segments: segment_pb2_grpc.SegmentServiceStub
    template_channel: grpc.aio.Channel
    templates: template_pb2_grpc.TemplateServiceStub
    billing_channel: grpc.aio.Channel
    billing: billing_pb2_grpc.BillingServiceStub
    _bus: Bus | None = None
    _bus_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def open(cls, settings: GatewaySettings) -> Backends:
        campaign_channel = channel(
            settings.campaign_addr,
            deadline=settings.grpc_deadline_seconds,
            service=CAMPAIGN_SERVICE,
            idempotent_methods=CAMPAIGN_IDEMPOTENT,
        )
        execution_channel = channel(
            settings.execution_addr,
            deadline=settings.grpc_deadline_seconds,
            service=EXECUTION_SERVICE,
            idempotent_methods=EXECUTION_IDEMPOTENT,
        )
        segment_channel = channel(
            settings.segment_addr,
            deadline=settings.grpc_deadline_seconds,
            service=SEGMENT_SERVICE,
            idempotent_methods=SEGMENT_IDEMPOTENT,
        )
        template_channel = channel(
            settings.template_addr,
            deadline=settings.grpc_deadline_seconds,
            service=TEMPLATE_SERVICE,
            idempotent_methods=TEMPLATE_IDEMPOTENT,
        )
        billing_channel = channel(
            settings.billing_addr,
            deadline=settings.grpc_deadline_seconds,
            service=BILLING_SERVICE,
            idempotent_methods=BILLING_IDEMPOTENT,
        )
        return cls(
            settings=settings,
            segment_channel=segment_channel,
            segments=segment_pb2_grpc.SegmentServiceStub(segment_channel),
            template_channel=template_channel,
            templates=template_pb2_grpc.TemplateServiceStub(template_channel),
            billing_channel=billing_channel,
            billing=billing_pb2_grpc.BillingServiceStub(billing_channel),
            campaign_channel=campaign_channel,
            campaign_health_channel=grpc.aio.insecure_channel(settings.campaign_addr),
            campaigns=campaign_pb2_grpc.CampaignServiceStub(campaign_channel),
            execution_channel=execution_channel,
            executions=execution_pb2_grpc.ExecutionServiceStub(execution_channel),
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
        await self.campaign_channel.close()
        await self.campaign_health_channel.close()
        await self.execution_channel.close()
        await self.segment_channel.close()
        await self.template_channel.close()
        await self.billing_channel.close()


def get_backends(request: Request) -> Backends:
    backends: Backends = request.app.state.backends
    return backends
