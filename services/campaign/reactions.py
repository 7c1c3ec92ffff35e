"""What the campaign service hears on the bus: run progress (completion), provider breakers and
refused requests (PAUSED_ERROR), balance exhaustion (PAUSED_BALANCE), contact events (event
triggers), and the
scheduler loop. One durable consumer per kind, so each is acknowledged on its own; their lag is
polled into `shoal_consumer_lag`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import Message

from services.campaign.lifecycle import Lifecycle
from shoal.bus import STREAM_EVENTS, Bus, Delivery, consume
from shoal.metrics import ConsumerLagPoller
from shoal.v1 import events_pb2 as ev

log = logging.getLogger(__name__)


def _each(fn: Callable[[Any], Awaitable[None]]) -> Callable[[list[Delivery[Any]]], Awaitable[None]]:
    async def handler(deliveries: list[Delivery[Any]]) -> None:
        for d in deliveries:
            await fn(d.payload)

    return handler


async def start(
    bus: Bus, lifecycle: Lifecycle, stop: asyncio.Event, *, scheduler_interval: float
) -> list[asyncio.Task[Any]]:
    async def progress(deliveries: list[Delivery[ev.RunProgress]]) -> None:
        # Only the newest progress of each run matters; completion re-reads live counts anyway.
        latest = {d.payload.run_id: d.payload for d in deliveries}
        for p in latest.values():
            await lifecycle.check_completion(p.workspace_id, p.run_id, p)

    async def contacts(deliveries: list[Delivery[ev.ContactEvent]]) -> None:
        await lifecycle.on_contact_events([d.payload for d in deliveries])

    Handler = Callable[[list[Delivery[Any]]], Awaitable[None]]
    routes: list[tuple[str, list[str], type[Message], Handler]] = [
        ("campaign-progress", [bus.event_subject("execution", "run_progress")], ev.RunProgress, progress),
        (
            "campaign-breaker",
            [bus.event_subject("provider", "breaker_opened")],
            ev.ProviderBreakerChanged,
            _each(lifecycle.on_breaker),
        ),
        (
            "campaign-provider-refused",
            [bus.event_subject("provider", "request_refused")],
            ev.ProviderRequestRefused,
            _each(lifecycle.on_request_refused),
        ),
        (
            "campaign-balance",
            # balance_short: holds failing again inside an exhausted episode (e.g. a campaign
            # resumed without a top-up); it pauses the same way.
            [
                bus.event_subject("billing", "balance_exhausted"),
                bus.event_subject("billing", "balance_short"),
            ],
            ev.BalanceEvent,
            _each(lifecycle.on_balance_exhausted),
        ),
        ("campaign-contacts", [bus.subject("shoal.events.contact.>")], ev.ContactEvent, contacts),
    ]
    tasks = []
    for durable, subjects, decode, fn in routes:
        await bus.ensure_consumer(STREAM_EVENTS, durable, filter_subjects=subjects, max_deliver=20)
        tasks.append(
            asyncio.create_task(
                consume(
                    bus,
                    stream=STREAM_EVENTS,
                    durable=durable,
                    decode=decode,
                    handler=fn,
                    batch=500,
                    fetch_timeout=0.5,
                    stop=stop,
                    max_deliver=20,
                ),
                name=durable,
            )
        )
    tasks.append(asyncio.create_task(scheduler(lifecycle, stop, scheduler_interval), name="scheduler"))
    lag = ConsumerLagPoller(bus, [(STREAM_EVENTS, durable) for durable, *_ in routes])
    tasks.append(asyncio.create_task(lag.run(stop), name="consumer-lag"))
    return tasks


async def scheduler(lifecycle: Lifecycle, stop: asyncio.Event, interval: float) -> None:
    while not stop.is_set():
        try:
            await lifecycle.tick_scheduler()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("scheduler tick failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
