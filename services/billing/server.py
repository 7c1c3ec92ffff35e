"""Wiring of the billing service: database, bus, outbox, auto-reload, servicer, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

from services.billing import ledger
from services.billing.autoreload import AutoReloader, Clock, utc_now
from services.billing.config import BillingSettings
from services.billing.outbox import Outbox
from services.billing.payments import PaymentGateway, SandboxPayments
from services.billing.servicer import BillingServicer
from shoal.bus import Bus
from shoal.db import Database
from shoal.grpc import GrpcServer, ServiceBinding
from shoal.v1 import billing_pb2, billing_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"


async def build(
    settings: BillingSettings,
    *,
    namespace: str = "",
    clock: Clock = utc_now,
    payments: PaymentGateway | None = None,
) -> GrpcServer:
    """The billing server, not yet started. `clock` and `payments` are for tests (time travel,
    a gateway of their own); by default the real UTC clock and the sandbox gateway from settings."""
    db = Database(settings.resolved_database_url("billing"), migrations_dir=MIGRATIONS)
    await db.call(db.migrate)
    bus = await Bus.connect(settings.nats_url, name="billing", namespace=namespace or settings.namespace)
    await bus.ensure_streams()
    outbox = Outbox(db=db, bus=bus)
    defaults = ledger.Defaults(
        max_balance_cents=settings.default_max_balance_cents,
        low_threshold_cents=settings.default_low_balance_threshold_cents,
    )
    reloader = AutoReloader(
        db=db,
        payments=payments
        or SandboxPayments(settings.payment_mode, slow_seconds=settings.payment_slow_seconds),
        outbox=outbox,
        defaults=defaults,
        clock=clock,
        retry_after=timedelta(seconds=settings.auto_reload_retry_after_seconds),
        payment_timeout=settings.payment_timeout_seconds,
    )
    servicer = BillingServicer(db=db, outbox=outbox, reloader=reloader, settings=settings, clock=clock)
    stop = asyncio.Event()
    background = asyncio.create_task(
        reloader.loop(stop, settings.background_interval_seconds), name="billing-background"
    )

    async def stop_background() -> None:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await background

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
    # Closed last-first: the loop and payments stop, the outbox finishes, then the database and NATS.
    server.closers.extend([bus.close, db.close, outbox.close, reloader.close, stop_background])
    return server
