"""Provider receipts (shoal.events.message.<status>) become contact events.

CONDITION nodes ask "did the contact open / click / get the message" through QueryEvents, and
segment filters count events, so every receipt for a known contact is recorded once: the event id
is derived from the receipt (provider, message, status), so a redelivered receipt finds its event
already stored. An email bounce also moves an ACTIVE contact to BOUNCED, so later sends skip it.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlmodel import Session

from services.segment import ids, repo
from shoal.bus import Delivery
from shoal.db import Database
from shoal.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)

Closer = Callable[[], Awaitable[None]]

DURABLE = "segment-receipts"
SUBJECTS = ["shoal.events.message.>"]

_EMAIL_TYPES = {
    events_pb2.RECEIPT_STATUS_OPENED: "email.opened",
    events_pb2.RECEIPT_STATUS_CLICKED: "email.clicked",
}
_TYPES = {
    events_pb2.RECEIPT_STATUS_DELIVERED: "message.delivered",
    events_pb2.RECEIPT_STATUS_FAILED: "message.failed",
    events_pb2.RECEIPT_STATUS_OPENED: "message.opened",
    events_pb2.RECEIPT_STATUS_CLICKED: "message.clicked",
    events_pb2.RECEIPT_STATUS_BOUNCED: "message.bounced",
}


def event_type(receipt: events_pb2.MessageReceipt) -> str | None:
    if receipt.channel == common_pb2.CHANNEL_EMAIL and receipt.status in _EMAIL_TYPES:
        return _EMAIL_TYPES[receipt.status]
    return _TYPES.get(receipt.status)


def receipt_event_id(receipt: events_pb2.MessageReceipt) -> str:
    """The same receipt always maps to the same `evt_` id."""
    key = f"{receipt.provider}\x1f{receipt.send_key or receipt.provider_message_id}\x1f{receipt.status}"
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:13], "big") >> 4  # 100 bits
    return ids.id_from_bits(ids.EVENT, digest)


def to_event(receipt: events_pb2.MessageReceipt) -> repo.EventData | None:
    kind = event_type(receipt)
    if kind is None or not ids.is_id(receipt.contact_id, ids.CONTACT):
        return None
    occurred = receipt.time.ToDatetime(tzinfo=UTC) if receipt.HasField("time") else datetime.now(UTC)
    send_key = receipt.send_key
    properties = {"provider": receipt.provider, "send_key": send_key}
    if receipt.error:
        properties["error"] = receipt.error[:500]
    # send_key is "execution_id:node_id"; the node narrows QueryEvents for CONDITION nodes.
    node_id = receipt.node_id or (send_key.rsplit(":", 1)[-1] if ":" in send_key else "")
    return repo.EventData(
        contact_id=receipt.contact_id,
        type=kind,
        occurred_at=occurred,
        properties=properties,
        message_id=(receipt.provider_message_id or send_key)[:64],
        campaign_id=receipt.campaign_id[:64],
        node_id=node_id[:64],
        run_id=receipt.run_id[:64],
        event_id=receipt_event_id(receipt),
    )


class ReceiptRecorder:
    """The handler of the receipts consumer: one transaction per batch, acked after commit."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __call__(self, deliveries: list[Delivery[events_pb2.MessageReceipt]]) -> None:
        by_workspace: dict[str, list[repo.EventData]] = defaultdict(list)
        bounced: dict[str, list[str]] = defaultdict(list)
        for delivery in deliveries:
            receipt = delivery.payload
            event = to_event(receipt)
            if event is None or not receipt.workspace_id:
                continue  # not about a contact we could know: acked and dropped
            by_workspace[receipt.workspace_id].append(event)
            if (
                receipt.status == events_pb2.RECEIPT_STATUS_BOUNCED
                and receipt.channel == common_pb2.CHANNEL_EMAIL
            ):
                bounced[receipt.workspace_id].append(receipt.contact_id)
        if not by_workspace:
            return
        now = datetime.now(UTC)

        def work(session: Session) -> int:
            stored = 0
            for ws, events in by_workspace.items():
                stored += len(repo.record_events(session, workspace_id=ws, events=events, now=now))
                if bounced.get(ws):
                    repo.mark_bounced(session, workspace_id=ws, contact_ids=bounced[ws], now=now)
            return stored

        stored = await self.db.run(work)
        log.debug("recorded %d contact events from %d receipts", stored, len(deliveries))
