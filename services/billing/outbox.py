"""Billing events: written in the transaction that caused them, published after the commit.

An event is a row of `outbox` until NATS has acknowledged it. The servicer kicks a flush after a
commit that wrote events (never awaiting it: a hold must not wait for NATS), and the background
loop flushes whatever a crash or an outage left behind. The Nats-Msg-Id is unique per row, so a
row published twice (two flushers, or a crash after publish and before marking) is stored once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from google.protobuf.message import Message
from sqlalchemy import delete, insert, select, update
from sqlmodel import Session

from services.billing.models import OutboxEvent
from shoal.bus import Bus, Outgoing
from shoal.db import Database
from shoal.v1 import events_pb2

log = logging.getLogger(__name__)

_T = OutboxEvent.__table__.c  # type: ignore[attr-defined]


# The payload type of each event kind (the subject's last token).
_TYPES: dict[str, type[Message]] = {
    "balance_exhausted": events_pb2.BalanceEvent,
    "balance_short": events_pb2.BalanceEvent,
    "balance_low": events_pb2.BalanceEvent,
    "auto_reload_succeeded": events_pb2.AutoReloadResult,
    "auto_reload_failed": events_pb2.AutoReloadResult,
}


def add(session: Session, kind: str, message: Message, now: datetime) -> None:
    if kind not in _TYPES:
        raise ValueError(f"unknown billing event kind {kind!r}")
    session.execute(
        insert(OutboxEvent).values(
            kind=kind, payload=message.SerializeToString(), published=False, created_at=now
        )
    )


def _pending(session: Session, limit: int) -> list[tuple[int, str, bytes, datetime]]:
    rows = session.execute(
        select(_T.id, _T.kind, _T.payload, _T.created_at)
        .where(_T.published.is_(False))
        .order_by(_T.id)
        .limit(limit)
    ).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def prune(session: Session, *, before: datetime) -> int:
    """Forget published events older than `before` (NATS has them; the table is not an archive)."""
    result = session.execute(delete(OutboxEvent).where(_T.published.is_(True), _T.created_at < before))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _mark(session: Session, ids: list[int]) -> None:
    session.execute(update(OutboxEvent).where(_T.id.in_(ids)).values(published=True))


class Outbox:
    """Publishes the outbox table; one flush at a time per process."""

    def __init__(self, *, db: Database, bus: Bus | None) -> None:
        self.db = db
        self.bus = bus
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[int]] = set()

    def kick(self) -> None:
        """Flush soon, in the background."""
        task = asyncio.create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[int]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The row stays unpublished; the background loop tries again.
            log.warning("billing outbox flush failed: %r", task.exception())

    async def flush(self, *, batch: int = 500) -> int:
        """Publish every unpublished event; how many were published."""
        if self.bus is None:
            return 0
        published = 0
        async with self._lock:
            while True:
                rows = await self.db.run(_pending, batch)
                if not rows:
                    return published
                await self.bus.publish_many(
                    [
                        Outgoing(
                            self.bus.event_subject("billing", kind),
                            _TYPES[kind].FromString(payload),
                            # Unique across databases too: a fresh database restarts ids at 1.
                            msg_id=f"billing:{row_id}:{created.timestamp():.6f}",
                        )
                        for row_id, kind, payload, created in rows
                    ]
                )
                await self.db.run(_mark, [r[0] for r in rows])
                published += len(rows)

    async def close(self) -> None:
        for task in list(self._tasks):
            await asyncio.wait([task], timeout=5)
