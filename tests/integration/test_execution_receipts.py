"""Receipts settle sends forward only, idempotently, on a real database (SQLite, and PostgreSQL
when set)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from services.execution.models import Send
from services.execution.receipts import ACCEPTED, DELIVERED, FAILED, apply_receipts
from services.execution.server import MIGRATIONS
from shoal.db import Database
from shoal.v1 import events_pb2 as ev


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url, migrations_dir=MIGRATIONS)
    database.migrate()
    with database.session() as s:
        for key in ("e1:s1", "e2:s1", "e3:s1", "e4:s1"):
            s.add(
                Send(
                    key=key,
                    workspace_id="ws",
                    execution_id=key.split(":")[0],
                    run_id="run_1",
                    campaign_id="cmp",
                    node_id="s1",
                    channel=1,
                    provider="sandbox",
                    status=ACCEPTED,
                )
            )
    yield database
    database.engine.dispose()


def receipt(key: str, status: int) -> ev.MessageReceipt:
    return ev.MessageReceipt(workspace_id="ws", send_key=key, status=status)


def statuses(db: Database) -> dict[str, int]:
    with db.session() as s:
        return {key: status for key, status in s.execute(select(Send.key, Send.status)).all()}


def test_receipts_move_sends_forward_only(db: Database) -> None:
    batch = [
        receipt("e1:s1", ev.RECEIPT_STATUS_DELIVERED),
        receipt("e2:s1", ev.RECEIPT_STATUS_FAILED),
        receipt("e3:s1", ev.RECEIPT_STATUS_OPENED),  # an open implies delivery
        receipt("nobody:s1", ev.RECEIPT_STATUS_DELIVERED),  # unknown keys change nothing
    ]
    with db.session() as s:
        assert apply_receipts(s, batch) == 3
    assert statuses(db) == {"e1:s1": DELIVERED, "e2:s1": FAILED, "e3:s1": DELIVERED, "e4:s1": ACCEPTED}
    # The same batch again (a redelivery) and stale or out-of-order receipts change nothing.
    with db.session() as s:
        assert apply_receipts(s, batch) == 0
        assert apply_receipts(s, [receipt("e1:s1", ev.RECEIPT_STATUS_FAILED)]) == 0
        assert apply_receipts(s, [receipt("e2:s1", ev.RECEIPT_STATUS_DELIVERED)]) == 0
    # A late bounce is the truth about the address: it overrides a delivery.
    with db.session() as s:
        assert apply_receipts(s, [receipt("e1:s1", ev.RECEIPT_STATUS_BOUNCED)]) == 1
    assert statuses(db)["e1:s1"] == FAILED
