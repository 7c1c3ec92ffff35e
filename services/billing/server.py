"""Wiring of the billing service: database, bus, servicer, gRPC server."""

from __future__ import annotations

from pathlib import Path

from services.billing.config import BillingSettings
from services.billing.servicer import BillingServicer
from shoal.bus import Bus
from shoal.db import Database
from shoal.grpc import GrpcServer, ServiceBinding
from shoal.v1 import billing_pb2, billing_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(settings: BillingSettings, *, namespace: str = "") -> GrpcServer:
    db = Database(settings.resolved_database_url("billing"), migrations_dir=MIGRATIONS)
    await db.call(db.migrate)
    bus = await Bus.connect(settings.nats_url, name="billing", namespace=namespace)
    await bus.ensure_streams()
    servicer = BillingServicer(db=db, bus=bus, settings=settings)
    server = GrpcServer(
        "billing",
        [
            ServiceBinding(
                billing_pb2_grpc.add_BillingServiceServicer_to_server,
                servicer,
                billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name,
            )
        ],
        host=settings.host,
        port=settings.port,
    )
    server.closers.extend([bus.close, db.close])
    return server
