"""Provider receipts update the sends they are about: ACCEPTED -> DELIVERED or FAILED.

The gateway publishes every verified receipt as `message.<status>` (events.proto MessageReceipt,
keyed by the send's `execution_id:node_id`). The execution service keeps one durable consumer on
those subjects and applies a batch in one transaction. Status only moves forward: a delivery
(or an open or click, which imply it) settles an ACCEPTED send; a failure settles an ACCEPTED
one; a bounce also overrides DELIVERED (a late bounce is the truth about the address). Applying
the same receipt twice changes nothing, so redelivery is harmless. Money is not touched here:
the hold was captured when the provider accepted the message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from sqlalchemy import update
from sqlalchemy.orm import Session

from services.execution import repo
from services.execution.models import Send
from shoal.bus import STREAM_EVENTS, Bus, Delivery, consume
from shoal.db import Database
from shoal.v1 import events_pb2 as ev
from shoal.v1 import execution_pb2 as epb

DURABLE = "execution-receipts"
ACCEPTED, DELIVERED, FAILED = epb.SEND_STATUS_ACCEPTED, epb.SEND_STATUS_DELIVERED, epb.SEND_STATUS_FAILED
_DELIVERED = {ev.RECEIPT_STATUS_DELIVERED, ev.RECEIPT_STATUS_OPENED, ev.RECEIPT_STATUS_CLICKED}
_FAILED = {ev.RECEIPT_STATUS_FAILED}
_BOUNCED = {ev.RECEIPT_STATUS_BOUNCED}


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


async def run(bus: Bus, db: Database, stop: asyncio.Event) -> None:
    """Consume receipts until `stop`; each batch is one transaction, acknowledged after it commits."""
    await bus.ensure_consumer(
        STREAM_EVENTS, DURABLE, filter_subjects=[bus.subject("shoal.events.message.>")], max_deliver=20
    )

    async def handle(deliveries: list[Delivery[ev.MessageReceipt]]) -> None:
        await db.run(apply_receipts, [d.payload for d in deliveries])

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
