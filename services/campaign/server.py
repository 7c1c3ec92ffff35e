"""Wiring of the campaign service: database, bus, state bucket, peers, reactions, gRPC."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from services.campaign import reactions
from services.campaign.config import CampaignSettings
from services.campaign.lifecycle import Lifecycle, utcnow
from services.campaign.peers import Peers
from services.campaign.servicer import CampaignServicer
from shoal.bus import Bus
from shoal.campaign_states import CampaignStates
from shoal.db import Database
from shoal.grpc import GrpcServer, ServiceBinding
from shoal.v1 import campaign_pb2, campaign_pb2_grpc

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


async def build(
    settings: CampaignSettings, *, namespace: str = "", clock: Callable[[], datetime] = utcnow
) -> GrpcServer:
    """The campaign server, not yet started. `clock` is for tests (the scheduler's clock jumps)."""
    db = Database(settings.resolved_database_url("campaign"), migrations_dir=MIGRATIONS)
    await db.call(db.migrate)
    bus = await Bus.connect(settings.nats_url, name="campaign", namespace=namespace or settings.namespace)
    await bus.ensure_streams()
    kv = await CampaignStates.open(bus)
    peers = Peers.connect(settings)
    lifecycle = Lifecycle(
        db=db,
        bus=bus,
        kv=kv,
        peers=peers,
        schedule_grace=timedelta(seconds=settings.schedule_grace_seconds),
        idempotency_ttl=timedelta(hours=settings.trigger_idempotency_hours),
        clock=clock,
    )
    stop = asyncio.Event()
    tasks = await reactions.start(
        bus, lifecycle, stop, scheduler_interval=settings.scheduler_interval_seconds
    )
    server = GrpcServer(
        "campaign",
        [
            ServiceBinding(
                campaign_pb2_grpc.add_CampaignServiceServicer_to_server,
                CampaignServicer(lifecycle),
                campaign_pb2.DESCRIPTOR.services_by_name["CampaignService"].full_name,
            )
        ],
        host=settings.host,
        port=settings.port,
    )

    async def stop_reactions() -> None:
        stop.set()
        results: list[Any] = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, Exception):
                log.error("%s ended with %r", task.get_name(), result)

    server.closers.extend([db.close, bus.close, peers.close, stop_reactions])
    return server
