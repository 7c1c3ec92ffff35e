"""Wiring of the execution service: database, bus, peers, providers, workers, timers, gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, select

from services.execution import receipts, repo
from services.execution.config import ExecutionSettings
from services.execution.engine import Engine
from services.execution.fanout import Fanout
from services.execution.peers import Peers
from services.execution.providers.registry import build_providers, close_providers
from services.execution.servicer import ExecutionServicer
from services.execution.timers import TimerLoop
from shoal.bus import STREAM_EVENTS, STREAM_EXEC, Bus, consume
from shoal.campaign_states import CampaignStates
from shoal.db import Database
from shoal.grpc import GrpcServer, ServiceBinding
from shoal.metrics import EXECUTION_STATES, ConsumerLagPoller, Metrics
from shoal.metrics import default as default_metrics
from shoal.v1 import events_pb2, execution_pb2, execution_pb2_grpc

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
WORKERS_DURABLE = "execution-workers"
# How often `shoal_executions_by_state` is recounted (one SUM over the runs' counters).
STATE_COUNT_SECONDS = 5.0


def count_by_state(session: Any) -> dict[str, int]:
    """Executions per state over all runs, from the run counters (moved in the same transactions
    as the executions): one aggregate over the runs table, never a scan of the executions."""
    row = session.execute(
        select(*(func.coalesce(func.sum(getattr(repo.R.c, s)), 0) for s in EXECUTION_STATES))
    ).one()
    return {state: int(n) for state, n in zip(EXECUTION_STATES, row, strict=True)}


async def count_states(db: Database, stop: asyncio.Event, *, metrics: Metrics, interval: float) -> None:
    """Publish `shoal_executions_by_state` every `interval` seconds until `stop`."""
    while not stop.is_set():
        try:
            metrics.set_executions_by_state(await db.run(count_by_state))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("counting executions by state failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


def _bigger_page_cache(db: Database) -> None:
    """64 MB of page cache instead of SQLite's 2 MB: the executions table and its indexes are
    read and rewritten in every batch, and re-reading their pages from the OS costs CPU."""

    @event.listens_for(db.engine, "connect")
    def _cache(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA cache_size=-65536")

    db.engine.dispose()  # connections opened for the migration reconnect with the pragma


async def build(settings: ExecutionSettings, *, namespace: str = "") -> GrpcServer:
    db = Database(settings.resolved_database_url("execution"), migrations_dir=MIGRATIONS)
    await db.call(db.migrate)
    if db.sqlite:
        _bigger_page_cache(db)
    bus = await Bus.connect(settings.nats_url, name="execution", namespace=namespace or settings.namespace)
    await bus.ensure_streams()
    states = await CampaignStates.open(bus)
    peers = Peers.connect(settings)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    fanout: Fanout | None = None
    providers = build_providers(settings)
    renudge = timedelta(seconds=settings.renudge_seconds)

    if settings.workers:
        metrics = default_metrics()
        await bus.ensure_consumer(
            STREAM_EXEC,
            WORKERS_DURABLE,
            filter_subjects=[bus.subject("shoal.exec.step.>")],
            max_deliver=settings.max_deliver,
            ack_wait=max(30.0, settings.lease_seconds),
        )
        engine = Engine(
            db=db,
            bus=bus,
            peers=peers,
            providers=providers,
            states=states,
            settings=settings,
            metrics=metrics,
        )
        fanout = Fanout(
            db=db,
            bus=bus,
            segment=peers.segment,
            page_size=settings.fanout_page_size,
            owner=f"{socket.gethostname()}:{os.getpid()}",
            renudge=renudge,
            on_progress=engine.publish_progress,
            metrics=metrics,
        )
        timer = TimerLoop(
            db=db, bus=bus, states=states, interval=settings.timer_interval_seconds, renudge=renudge
        )
        for n in range(settings.worker_concurrency):
            tasks.append(
                asyncio.create_task(
                    consume(
                        bus,
                        stream=STREAM_EXEC,
                        durable=WORKERS_DURABLE,
                        decode=events_pb2.StepMessage,
                        handler=engine.handle,
                        batch=settings.batch_size,
                        fetch_timeout=settings.fetch_timeout_seconds,
                        stop=stop,
                        max_deliver=settings.max_deliver,
                    ),
                    name=f"step-worker-{n}",
                )
            )
        tasks.append(asyncio.create_task(timer.run(stop), name="timers"))
        tasks.append(asyncio.create_task(receipts.run(bus, db, stop), name="receipts"))
        tasks.append(
            asyncio.create_task(
                count_states(db, stop, metrics=metrics, interval=STATE_COUNT_SECONDS), name="state-counts"
            )
        )
        lag = ConsumerLagPoller(
            bus, [(STREAM_EXEC, WORKERS_DURABLE), (STREAM_EVENTS, receipts.DURABLE)], metrics
        )
        tasks.append(asyncio.create_task(lag.run(stop), name="consumer-lag"))
        await fanout.resume_all()
        tasks.append(asyncio.create_task(fanout.watch(stop), name="fanout-watch"))

    servicer = ExecutionServicer(db=db, bus=bus, states=states, fanout=fanout, renudge=renudge)
    server = GrpcServer(
        "execution",
        [
            ServiceBinding(
                execution_pb2_grpc.add_ExecutionServiceServicer_to_server,
                servicer,
                execution_pb2.DESCRIPTOR.services_by_name["ExecutionService"].full_name,
            )
        ],
        host=settings.host,
        port=settings.port,
    )

    async def stop_workers() -> None:
        # The batch in hand finishes and is settled; then nothing new is fetched.
        stop.set()
        if fanout is not None:
            await fanout.stop()
        for task in tasks:
            try:
                await asyncio.wait_for(task, timeout=settings.shutdown_grace_seconds + 5)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
            except Exception:
                log.exception("worker task %s ended with an error", task.get_name())

    async def close_providers_() -> None:
        await close_providers(providers)

    # Closers run in reverse: workers stop first, then peers and providers, then NATS, then the db.
    server.closers.extend([db.close, bus.close, peers.close, close_providers_, stop_workers])
    return server
