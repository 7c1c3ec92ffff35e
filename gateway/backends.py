"""The gateway's gRPC clients: one channel per service it calls, opened in the app's lifespan.

Channels are created inside the running event loop (grpc.aio binds a channel to the loop that
first uses it) and closed on shutdown, so no call outlives the app.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from fastapi import Request

from gateway.config import GatewaySettings
from shoal.grpc import channel
from shoal.v1 import campaign_pb2, campaign_pb2_grpc

CAMPAIGN_SERVICE = campaign_pb2.DESCRIPTOR.services_by_name["CampaignService"].full_name
# Reads only: retrying them on UNAVAILABLE can never do a thing twice.
CAMPAIGN_IDEMPOTENT = ("GetCampaign", "ListCampaigns", "GetCampaignStatus", "ListRuns", "ListTransitions")


@dataclass
class Backends:
    settings: GatewaySettings
    campaign_channel: grpc.aio.Channel
    # Health checks go over a plain channel: no trace per probe, no retries hiding an outage.
    campaign_health_channel: grpc.aio.Channel
    campaigns: campaign_pb2_grpc.CampaignServiceStub

    @classmethod
    def open(cls, settings: GatewaySettings) -> Backends:
        campaign_channel = channel(
            settings.campaign_addr,
            deadline=settings.grpc_deadline_seconds,
            service=CAMPAIGN_SERVICE,
            idempotent_methods=CAMPAIGN_IDEMPOTENT,
        )
        return cls(
            settings=settings,
            campaign_channel=campaign_channel,
            campaign_health_channel=grpc.aio.insecure_channel(settings.campaign_addr),
            campaigns=campaign_pb2_grpc.CampaignServiceStub(campaign_channel),
        )

    async def close(self) -> None:
        await self.campaign_channel.close()
        await self.campaign_health_channel.close()


def get_backends(request: Request) -> Backends:
    backends: Backends = request.app.state.backends
    return backends
