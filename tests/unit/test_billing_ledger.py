"""The billing domain functions on a real (SQLite) database, without gRPC or NATS: hold
arithmetic, episode flags, the auto-reload decision and its attempts, the sandbox gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.billing import ledger
from services.billing.autoreload import AutoReloader
from services.billing.models import LedgerEntry, OutboxEvent
from services.billing.outbox import Outbox
from services.billing.payments import PaymentResult, SandboxPayments
from services.billing.pricing import SendCost, estimate, price_of
from services.billing.server import MIGRATIONS
from shoal.db import Database
from shoal.errors import InvalidArgument
from shoal.v1 import billing_pb2 as pb
from shoal.v1 import common_pb2 as common

WS = "ws_unit"
T0 = datetime(2026, 5, 1, 23, 0, tzinfo=UTC)
DEFAULTS = ledger.Defaults(max_balance_cents=500_000, low_threshold_cents=0)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'billing.db'}", migrations_dir=MIGRATIONS)
    database.migrate()
    yield database
    database.engine.dispose()


def sms(key: str, units: int = 1) -> ledger.HoldRequest:
    return ledger.HoldRequest(key, common.CHANNEL_SMS, common.MESSAGE_TYPE_MESSAGE, 0, units, "cmp")


def top_up(db: Database, cents: int, now: datetime = T0) -> None:
    with db.session() as s:
        account = ledger.lock_account(s, workspace_id=WS, defaults=DEFAULTS, now=now)
        ledger.top_up(s, account=account, amount_cents=cents, idempotency_key="", kind=1, now=now)


def hold(db: Database, items: list[ledger.HoldRequest], now: datetime = T0) -> ledger.BatchOutcome:
    with db.session() as s:
        account = ledger.lock_account(s, workspace_id=WS, defaults=DEFAULTS, now=now)
        return ledger.hold_batch(s, account=account, items=items, now=now, daily_reload_cap=3)


def outbox_kinds(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.execute(select(OutboxEvent.kind).order_by(OutboxEvent.id)).scalars())


def test_each_item_is_held_whole_or_not_at_all(db: Database) -> None:
    top_up(db, 20)
    # 3 segments cost 21 > 20: refused whole; the cheaper items after it still fit.
    outcome = hold(db, [sms("big", units=3), sms("a"), sms("b"), sms("c")])
    assert [(a.key, a.status, a.amount_cents) for a in outcome.answers] == [
        ("big", ledger.INSUFFICIENT, 21),
        ("a", ledger.HELD, 7),
        ("b", ledger.HELD, 7),
        ("c", ledger.INSUFFICIENT, 7),
    ]
    assert (outcome.account.free_cents, outcome.account.reserved_cents) == (6, 14)
    with db.session() as s:
        assert ledger.rebuild_balance(s, workspace_id=WS) == (6, 14)
    with pytest.raises(InvalidArgument):
        hold(db, [sms("x"), sms("x")])
    with pytest.raises(InvalidArgument):
        hold(db, [ledger.HoldRequest("y", common.CHANNEL_SMS, common.MESSAGE_TYPE_MESSAGE, 99, 1)])


def _ledger_rows(db: Database) -> list[tuple[int, str | None]]:
    with db.session() as s:
        rows = s.execute(select(LedgerEntry.kind, LedgerEntry.key).order_by(LedgerEntry.id)).all()
    return [(r[0], r[1]) for r in rows]


def test_each_keyed_entry_exists_once(db: Database) -> None:
    # A keyed top-up replayed credits once; the ledger's own unique index backs the lookup.
    for _ in range(2):
        with db.session() as s:
            account = ledger.lock_account(s, workspace_id=WS, defaults=DEFAULTS, now=T0)
            ledger.top_up(
                s,
                account=account,
                amount_cents=100,
                idempotency_key="inv-1",
                kind=pb.LEDGER_ENTRY_KIND_TOP_UP,
                now=T0,
            )
    with pytest.raises(IntegrityError), db.session() as s:
        ledger.bulk_insert_ledger(s, WS, pb.LEDGER_ENTRY_KIND_TOP_UP, T0, [("inv-1", 100, 0)])
    with pytest.raises(ValueError, match="idempotency key"), db.session() as s:
        account = ledger.lock_account(s, workspace_id=WS, defaults=DEFAULTS, now=T0)
        ledger.top_up(
            s, account=account, amount_cents=1, idempotency_key="h", kind=pb.LEDGER_ENTRY_KIND_HOLD, now=T0
        )
    # A hold's entries exist once through its row: replayed holds, the same key twice in one
    # capture, a capture replayed and a late release write nothing more.
    hold(db, [sms("a"), sms("b")])
    hold(db, [sms("a"), sms("b")])
    for keys, capture in ((["a", "a", "zz"], True), (["a"], True), (["b", "a"], False), (["b"], False)):
        with db.session() as s:
            account = ledger.lock_account(s, workspace_id=WS, defaults=DEFAULTS, now=T0)
            ledger.settle_batch(s, account=account, keys=keys, capture=capture, now=T0)
    assert _ledger_rows(db) == [
        (pb.LEDGER_ENTRY_KIND_TOP_UP, "inv-1"),
        (pb.LEDGER_ENTRY_KIND_HOLD, "a"),
        (pb.LEDGER_ENTRY_KIND_HOLD, "b"),
        (pb.LEDGER_ENTRY_KIND_CAPTURE, "a"),
        (pb.LEDGER_ENTRY_KIND_RELEASE, "b"),
    ]
    with db.session() as s:
        assert ledger.rebuild_balance(s, workspace_id=WS) == (100 - 7, 0)


def test_exhausted_once_per_episode_and_ended_by_any_credit(db: Database) -> None:
    top_up(db, 10)
    assert hold(db, [sms("a"), sms("b")]).events == 1
    # Short again inside the episode: no second balance_exhausted, but a balance_short for the
    # campaign service (a campaign resumed without a top-up must pause again).
    assert hold(db, [sms("c")]).events == 1
    with db.session() as s:
        account = ledger.lock_account(s, workspace_id=WS, defaults=DEFAULTS, now=T0)
        answers, events = ledger.settle_batch(s, account=account, keys=["a"], capture=False, now=T0)
    assert answers[0].status == ledger.RELEASED
    assert events == 0
    # The release ended the episode (free rose); a capture credits nothing and ends nothing.
    assert hold(db, [sms("d"), sms("e")]).events == 1
    assert outbox_kinds(db) == [ledger.KIND_EXHAUSTED, ledger.KIND_SHORT, ledger.KIND_EXHAUSTED]


def _enable_reload(db: Database, *, threshold: int, amount: int) -> None:
    with db.session() as s:
        account = ledger.lock_account(s, workspace_id=WS, defaults=DEFAULTS, now=T0)
        account.auto_reload_enabled = True
        account.auto_reload_threshold_cents = threshold
        account.auto_reload_amount_cents = amount
        ledger.write_account(s, account, T0)


def _finish(db: Database, attempt_id: int, *, ok: bool, now: datetime) -> int:
    with db.session() as s:
        attempt = ledger.get_attempt(s, attempt_id)
        assert attempt is not None
        return ledger.finish_attempt(
            s,
            attempt=attempt,
            defaults=DEFAULTS,
            succeeded=ok,
            error="" if ok else "declined",
            now=now,
            retry_after=timedelta(days=1),
        )


def test_auto_reload_decision_cap_and_utc_day(db: Database) -> None:
    _enable_reload(db, threshold=1_000, amount=1_000)
    top_up(db, 1_000)
    fired = []
    n = 0
    for _ in range(4):
        outcome = hold(db, [sms(f"k{n}")])
        n += 1
        if outcome.reload_attempt_id is not None:
            # While pending, another hold below the threshold fires nothing.
            assert hold(db, [sms(f"k{n}")]).reload_attempt_id is None
            n += 1
            assert _finish(db, outcome.reload_attempt_id, ok=True, now=T0) == 1
            assert _finish(db, outcome.reload_attempt_id, ok=True, now=T0) == 0  # idempotent
            fired.append(outcome.reload_attempt_id)
            # Back above the threshold for the next round.
            free = hold(db, []).account.free_cents
            hold(db, [sms(f"k{n + i}") for i in range((free - 1_000) // 7)])
            n += (free - 1_000) // 7
    assert len(fired) == 3
    # 23:00 UTC + 1 h is a new UTC day: the cap starts again.
    assert hold(db, [sms("next-day")], now=T0 + timedelta(hours=1)).reload_attempt_id is not None
    with db.session() as s:
        assert ledger.rebuild_balance(s, workspace_id=WS) == (
            hold(db, []).account.free_cents,
            hold(db, []).account.reserved_cents,
        )


def test_failed_reload_retries_once_when_due(db: Database) -> None:
    _enable_reload(db, threshold=1_000, amount=2_000)
    top_up(db, 1_000)
    attempt_id = hold(db, [sms("a")]).reload_attempt_id
    assert attempt_id is not None
    _finish(db, attempt_id, ok=False, now=T0)
    with db.session() as s:
        assert ledger.due_retries(s, now=T0 + timedelta(hours=23)) == []
    with db.session() as s:
        retries = ledger.due_retries(s, now=T0 + timedelta(days=1))
    assert len(retries) == 1
    with db.session() as s:
        assert ledger.due_retries(s, now=T0 + timedelta(days=3)) == []
    _finish(db, retries[0], ok=False, now=T0 + timedelta(days=1))
    with db.session() as s:
        # A failed retry is final.
        assert ledger.due_retries(s, now=T0 + timedelta(days=5)) == []
        assert ledger.pending_attempts(s) == []
    assert outbox_kinds(db) == [ledger.KIND_RELOAD_FAILED, ledger.KIND_RELOAD_FAILED]


async def test_sandbox_payments_charge_once_per_key() -> None:
    payments = SandboxPayments("fail")
    assert not (await payments.charge(workspace_id=WS, amount_cents=1_000, idempotency_key="k")).succeeded
    payments.set_mode("succeed")
    first = await payments.charge(workspace_id=WS, amount_cents=1_000, idempotency_key="k")
    again = await payments.charge(workspace_id=WS, amount_cents=1_000, idempotency_key="k")
    assert first.succeeded and again == first
    assert payments.charges == [(WS, "k", 1_000)]


def test_prices_and_estimates_are_integer_cents() -> None:
    prices = {(common.CHANNEL_SMS, common.MESSAGE_TYPE_MESSAGE, common.BILLING_UNIT_SMS_SEGMENT): 7}
    assert price_of(prices, common.CHANNEL_SMS, common.MESSAGE_TYPE_MESSAGE, 0, 3) == 21
    assert price_of(prices, common.CHANNEL_EMAIL, common.MESSAGE_TYPE_MESSAGE, 0, 1) is None
    # Expected cost rounds up: 3 contacts x 7 cents x 50 % = 10.5 -> 11.
    assert estimate(3, [SendCost(7, 5_000, True)]) == (11, 21)
    assert pb.HOLD_STATUS_UNSPECIFIED == ledger.UNKNOWN


class _Stuck(SandboxPayments):
    async def charge(self, *, workspace_id: str, amount_cents: int, idempotency_key: str) -> PaymentResult:
        self.calls += 1
        await asyncio.sleep(30)
        raise AssertionError("never reached")


async def test_a_payment_slower_than_the_timeout_counts_as_failed(db: Database) -> None:
    _enable_reload(db, threshold=1_000, amount=1_000)
    top_up(db, 1_000)
    attempt_id = hold(db, [sms("a")]).reload_attempt_id
    assert attempt_id is not None
    reloader = AutoReloader(
        db=db,
        payments=_Stuck(),
        outbox=Outbox(db=db, bus=None),
        defaults=DEFAULTS,
        clock=lambda: T0,
        payment_timeout=0.05,
    )
    await reloader.run_attempt(attempt_id)
    with db.session() as s:
        attempt = ledger.get_attempt(s, attempt_id)
        assert attempt is not None and attempt.status == ledger.FAILED
    assert outbox_kinds(db) == [ledger.KIND_RELOAD_FAILED]
    # Run again (as a recovery would): a finished attempt is not charged again.
    await reloader.run_attempt(attempt_id)
    assert reloader.payments.calls == 1  # type: ignore[attr-defined]
