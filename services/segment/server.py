"""Wiring of the segment service: database, bus, receipts consumer, capability provider, gRPC server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.segment import receipts
from services.segment.capabilities import CapabilityLookup, SandboxCapabilities
from services.segment.config import SegmentSettings
from services.segment.servicer import SegmentServicer
from shoal.bus import STREAM_EVENTS, Bus, consume
from shoal.db import Database
from shoal.grpc import GrpcServer, ServiceBinding
from shoal.v1 import events_pb2, segment_pb2, segment_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = segment_pb2.DESCRIPTOR.services_by_name["SegmentService"].full_name


async def build(
    settings: SegmentSettings,
    *,
    bus: Bus | None = None,
    capability_lookup: CapabilityLookup | None = None,
) -> GrpcServer:
    """The service, unstarted. Tests pass their own bus (or none) and capability lookup."""
    db = Database(settings.resolved_database_url("segment"), migrations_dir=MIGRATIONS)
    await db.call(db.migrate)
    # Closers run in reverse order of this list: consumer, then bus, then providers, then the db.
    server = GrpcServer("segment", [], host=settings.host, port=settings.port)
    server.closers.append(db.close)
    if capability_lookup is None:
        sandbox = SandboxCapabilities(settings.sandbox_url, timeout=settings.capability_timeout_seconds)
        capability_lookup = sandbox
        server.closers.append(sandbox.close)
    if bus is None and (settings.publish_events or settings.consume_receipts):
        bus = await Bus.connect(settings.nats_url, name="segment", namespace=settings.namespace)
        await bus.ensure_streams()
        server.closers.append(bus.close)
    if bus is not None and settings.consume_receipts:
        server.closers.append(await start_receipts(bus, db))
    servicer = SegmentServicer(
        db=db,
        bus=bus if settings.publish_events else None,
        settings=settings,
        capability_lookup=capability_lookup,
    )
    server.bindings = [
        ServiceBinding(segment_pb2_grpc.add_SegmentServiceServicer_to_server, servicer, SERVICE_NAME)
    ]
    return server


async def start_receipts(bus: Bus, db: Database) -> receipts.Closer:
    """Start the durable receipts consumer; returns the closer that stops it after its batch."""
    await bus.ensure_consumer(STREAM_EVENTS, receipts.DURABLE, filter_subjects=receipts.SUBJECTS)
    stop = asyncio.Event()
    task = asyncio.create_task(
        consume(
            bus,
            stream=STREAM_EVENTS,
            durable=receipts.DURABLE,
            decode=events_pb2.MessageReceipt,
            handler=receipts.ReceiptRecorder(db),
            batch=receipts.BATCH,
            stop=stop,
        ),
        name="segment-receipts",
    )

    async def close() -> None:
        stop.set()
        await task

    return close
