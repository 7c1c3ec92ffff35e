"""Provider receipts update the sends they are about: ACCEPTED -> DELIVERED or FAILED.

The gateway publishes every verified receipt as `message.<status>` (events.proto MessageReceipt,
keyed by the send's `execution_id:node_id`). The execution service keeps one durable consumer on
those subjects and applies a batch in one transaction. Status only moves forward: a delivery
(or an open or click, which imply it) settles an ACCEPTED send; a failure settles an ACCEPTED
one; a bounce also overrides DELIVERED (a late bounce is the truth about the address). Applying
the same receipt twice changes nothing, so redelivery is harmless. Money is not touched here:
the hold was captured when the provider accepted the message.

A receipt can overtake its send: the carrier calls back while the worker that sent the message is
still capturing the hold and committing the batch, so the send's row is not there yet. Such a
receipt is retried (backing off) while it is younger than `EARLY_RECEIPT_GRACE`, instead of
being lost; one about a send that never shows up (not ours) is acknowledged after that.

Tracing: a receipt arrives in its own trace (the carrier's callback). Its CONSUMER span here links
to the span of the execution step that sent the message (`sends.traceparent`), so Jaeger leads
from a receipt to the send and its run's trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from opentelemetry import trace
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.execution import repo
from services.execution.models import Send
from shoal.bus import STREAM_EVENTS, Bus, Delivery, consume, retry_delay
from shoal.db import Database
from shoal.telemetry import extract
from shoal.v1 import events_pb2 as ev
from shoal.v1 import execution_pb2 as epb

DURABLE = "execution-receipts"
ACCEPTED, DELIVERED, FAILED = epb.SEND_STATUS_ACCEPTED, epb.SEND_STATUS_DELIVERED, epb.SEND_STATUS_FAILED
_DELIVERED = {ev.RECEIPT_STATUS_DELIVERED, ev.RECEIPT_STATUS_OPENED, ev.RECEIPT_STATUS_CLICKED}
_FAILED = {ev.RECEIPT_STATUS_FAILED}
_BOUNCED = {ev.RECEIPT_STATUS_BOUNCED}
# Longer than a worker's lease: a send whose worker died after the carrier took the message is
# committed by the retry, after the lease (SHOAL_EXECUTION_LEASE_SECONDS, default 60 s).
EARLY_RECEIPT_GRACE = timedelta(minutes=2)


def apply_receipts(session: Session, receipts: Sequence[ev.MessageReceipt]) -> int:
    """Settle the sends these receipts are about; returns how many rows changed."""
    delivered = sorted({r.send_key for r in receipts if r.status in _DELIVERED and r.send_key})
    failed = sorted({r.send_key for r in receipts if r.status in _FAILED and r.send_key})
    bounced = sorted({r.send_key for r in receipts if r.status in _BOUNCED and r.send_key})
    table = Send.__table__  # type: ignore[attr-defined]
    now = repo.now()
    changed = 0
    for keys, status, allowed in (
        (delivered, DELIVERED, (ACCEPTED,)),
        (failed, FAILED, (ACCEPTED,)),
        (bounced, FAILED, (ACCEPTED, DELIVERED)),
    ):
        if keys:
            result = session.execute(
                update(table)
                .where(table.c.key.in_(keys), table.c.status.in_(allowed))
                .values(status=status, updated_at=now)
            )
            changed += result.rowcount or 0
    return changed


def settle_receipts(session: Session, receipts: Sequence[ev.MessageReceipt]) -> dict[str, str]:
    """Apply the receipts; the recorded sends they name: key -> traceparent ("" if not traced)."""
    apply_receipts(session, receipts)
    keys = sorted({r.send_key for r in receipts if r.send_key})
    if not keys:
        return {}
    table = Send.__table__  # type: ignore[attr-defined]
    rows = session.execute(select(table.c.key, table.c.traceparent).where(table.c.key.in_(keys)))
    return {key: traceparent for key, traceparent in rows.all()}


def may_be_early(receipt: ev.MessageReceipt, num_delivered: int, now: datetime) -> bool:
    """Whether a receipt naming no recorded send may have overtaken its send's commit."""
    if not receipt.HasField("time"):
        return num_delivered < 5
    return now - receipt.time.ToDatetime(tzinfo=UTC) < EARLY_RECEIPT_GRACE


def link_to_sends(deliveries: Sequence[Delivery[ev.MessageReceipt]], sends: Mapping[str, str]) -> None:
    """Link each traced receipt's CONSUMER span to the span that sent its message."""
    linked: set[tuple[int, str]] = set()
    for d in deliveries:
        key = d.payload.send_key
        parent = sends.get(key)
        # One consumer span stands for the receipts of one callback: one link per send key.
        if not parent or not d.span.is_recording() or (id(d.span), key) in linked:
            continue
        linked.add((id(d.span), key))
        d.span.add_link(
            trace.get_current_span(extract({"traceparent": parent})).get_span_context(),
            {"shoal.send.key": key},
        )


async def run(bus: Bus, db: Database, stop: asyncio.Event) -> None:
    """Consume receipts until `stop`; each batch is one transaction, acknowledged after it commits."""
    await bus.ensure_consumer(
        STREAM_EVENTS, DURABLE, filter_subjects=[bus.subject("shoal.events.message.>")], max_deliver=20
    )

    async def handle(deliveries: list[Delivery[ev.MessageReceipt]]) -> None:
        sends = await db.run(settle_receipts, [d.payload for d in deliveries])
        now = repo.now()
        for d in deliveries:
            key = d.payload.send_key
            if key and key not in sends and may_be_early(d.payload, d.num_delivered, now):
                d.retry(retry_delay(d.num_delivered, base=0.5, cap=15.0))
        link_to_sends(deliveries, sends)

    await consume(
        bus,
        stream=STREAM_EVENTS,
        durable=DURABLE,
        decode=ev.MessageReceipt,
        handler=handle,
        batch=500,
        fetch_timeout=0.5,
        stop=stop,
        max_deliver=20,
    )
