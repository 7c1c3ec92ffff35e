"""Balance arithmetic: holds, captures, releases and top-ups, each written to the ledger.

Every function runs inside the caller's transaction and locks the account row first
(`SELECT ... FOR UPDATE` on PostgreSQL; SQLite has a single writer), so concurrent batches
serialise on the account and free balance can never go below zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlmodel
from sqlalchemy import insert, select, update
from sqlmodel import Session

from services.billing.models import Account, Hold, LedgerEntry, Price
from services.billing.pricing import DEFAULT_PRICES, PriceKey, price_of
from shoal.errors import InvalidArgument, NotFound
from shoal.v1 import billing_pb2 as pb

HELD, INSUFFICIENT, CAPTURED, RELEASED = (
    pb.HOLD_STATUS_HELD,
    pb.HOLD_STATUS_INSUFFICIENT_BALANCE,
    pb.HOLD_STATUS_CAPTURED,
    pb.HOLD_STATUS_RELEASED,
)


@dataclass(frozen=True)
class HoldRequest:
    key: str
    channel: int
    message_type: int
    unit: int
    units: int
    campaign_id: str = ""


@dataclass(frozen=True)
class HoldAnswer:
    key: str
    status: int
    amount_cents: int


@dataclass
class BatchOutcome:
    answers: list[HoldAnswer]
    account: Account
    # Set when this batch found the balance short and the account was not already exhausted.
    exhausted_now: bool = False
    short_campaigns: list[str] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


def lock_account(
    session: Session, *, workspace_id: str, max_balance_cents: int, low_threshold_cents: int
) -> Account:
    """The workspace's account row, created with default prices on first use, locked."""
    account = session.exec(
        sqlmodel.select(Account).where(Account.workspace_id == workspace_id).with_for_update()
    ).first()
    if account is not None:
        return account
    session.execute(
        insert(Account).values(
            workspace_id=workspace_id,
            free_cents=0,
            reserved_cents=0,
            max_balance_cents=max_balance_cents,
            low_balance_threshold_cents=low_threshold_cents,
            currency="EUR",
            exhausted=False,
            low=False,
            updated_at=_now(),
        )
    )
    session.execute(
        insert(Price),
        [
            {
                "workspace_id": workspace_id,
                "channel": c,
                "message_type": m,
                "unit": u,
                "cents": cents,
                "updated_at": _now(),
            }
            for (c, m, u), cents in DEFAULT_PRICES.items()
        ],
    )
    session.flush()
    return lock_account(
        session,
        workspace_id=workspace_id,
        max_balance_cents=max_balance_cents,
        low_threshold_cents=low_threshold_cents,
    )


def load_prices(session: Session, *, workspace_id: str) -> dict[PriceKey, int]:
    rows = session.execute(
        select(Price.channel, Price.message_type, Price.unit, Price.cents).where(
            Price.workspace_id == workspace_id
        )
    ).all()
    return {(r[0], r[1], r[2]): r[3] for r in rows}


def _write_account(session: Session, account: Account) -> None:
    session.execute(
        update(Account)
        .where(Account.workspace_id == account.workspace_id)
        .values(
            free_cents=account.free_cents,
            reserved_cents=account.reserved_cents,
            exhausted=account.exhausted,
            low=account.low,
            max_balance_cents=account.max_balance_cents,
            low_balance_threshold_cents=account.low_balance_threshold_cents,
            updated_at=_now(),
        )
    )


def hold_batch(session: Session, *, account: Account, items: Sequence[HoldRequest]) -> BatchOutcome:
    """Hold each item whole or answer INSUFFICIENT_BALANCE; a known key answers as before."""
    ws = account.workspace_id
    keys = [i.key for i in items]
    existing = {
        row[0]: HoldAnswer(row[0], row[1], row[2])
        for row in session.execute(
            select(Hold.key, Hold.status, Hold.amount_cents).where(
                Hold.workspace_id == ws, Hold.key.in_(keys)
            )
        ).all()
    }
    prices = load_prices(session, workspace_id=ws)
    answers: list[HoldAnswer] = []
    new_holds: list[dict[str, object]] = []
    ledger: list[dict[str, object]] = []
    short_campaigns: list[str] = []
    seen: set[str] = set()
    now = _now()
    for item in items:
        if item.key in existing:
            answers.append(existing[item.key])
            continue
        if item.key in seen:
            raise InvalidArgument.of("items.key", f"duplicate key {item.key!r} in one batch")
        seen.add(item.key)
        amount = price_of(prices, item.channel, item.message_type, item.unit, item.units)
        if amount is None:
            raise InvalidArgument.of(
                "items",
                f"no price for channel {item.channel}, message type {item.message_type}, unit {item.unit}",
            )
        if account.free_cents < amount:
            answers.append(HoldAnswer(item.key, INSUFFICIENT, amount))
            if item.campaign_id and item.campaign_id not in short_campaigns:
                short_campaigns.append(item.campaign_id)
            continue
        account.free_cents -= amount
        account.reserved_cents += amount
        answers.append(HoldAnswer(item.key, HELD, amount))
        new_holds.append(
            {
                "workspace_id": ws,
                "key": item.key,
                "amount_cents": amount,
                "status": HELD,
                "campaign_id": item.campaign_id,
                "created_at": now,
                "updated_at": now,
            }
        )
        ledger.append(
            {
                "workspace_id": ws,
                "kind": pb.LEDGER_ENTRY_KIND_HOLD,
                "free_delta_cents": -amount,
                "reserved_delta_cents": amount,
                "key": item.key,
                "created_at": now,
            }
        )
    if new_holds:
        session.execute(insert(Hold), new_holds)
        session.execute(insert(LedgerEntry), ledger)
    exhausted_now = (
        bool(short_campaigns or any(a.status == INSUFFICIENT for a in answers)) and not account.exhausted
    )
    if exhausted_now:
        account.exhausted = True
    _write_account(session, account)
    return BatchOutcome(
        answers=answers, account=account, exhausted_now=exhausted_now, short_campaigns=short_campaigns
    )


def settle_batch(
    session: Session, *, account: Account, keys: Sequence[str], capture: bool
) -> list[HoldAnswer]:
    """Capture (message sent) or release (message failed) held amounts; idempotent per key."""
    ws = account.workspace_id
    rows = session.execute(
        select(Hold.key, Hold.status, Hold.amount_cents).where(
            Hold.workspace_id == ws, Hold.key.in_(list(keys))
        )
    ).all()
    by_key = {r[0]: (r[1], r[2]) for r in rows}
    target = CAPTURED if capture else RELEASED
    answers: list[HoldAnswer] = []
    moved: list[str] = []
    ledger: list[dict[str, object]] = []
    now = _now()
    for key in keys:
        if key not in by_key:
            raise NotFound(f"no hold with key {key!r}", violations=[])
        status, amount = by_key[key]
        if status == HELD:
            moved.append(key)
            account.reserved_cents -= amount
            if not capture:
                account.free_cents += amount
            ledger.append(
                {
                    "workspace_id": ws,
                    "kind": pb.LEDGER_ENTRY_KIND_CAPTURE if capture else pb.LEDGER_ENTRY_KIND_RELEASE,
                    "free_delta_cents": 0 if capture else amount,
                    "reserved_delta_cents": -amount,
                    "key": key,
                    "created_at": now,
                }
            )
            by_key[key] = (target, amount)
            status = target
        answers.append(HoldAnswer(key, status, amount))
    if moved:
        session.execute(
            update(Hold)
            .where(Hold.workspace_id == ws, Hold.key.in_(moved))
            .values(status=target, updated_at=now)
        )
        session.execute(insert(LedgerEntry), ledger)
        if not capture and account.free_cents > 0:
            account.exhausted = False
        _write_account(session, account)
    return answers


def top_up(session: Session, *, account: Account, amount_cents: int, idempotency_key: str, kind: int) -> bool:
    """Credit free balance; False when this idempotency key was already credited."""
    if idempotency_key:
        seen = session.execute(
            select(LedgerEntry.id).where(
                LedgerEntry.workspace_id == account.workspace_id,
                LedgerEntry.kind == kind,
                LedgerEntry.key == idempotency_key,
            )
        ).first()
        if seen is not None:
            return False
    if account.free_cents + account.reserved_cents + amount_cents > account.max_balance_cents:
        raise InvalidArgument.of(
            "amount_cents",
            f"balance would exceed the account maximum of {account.max_balance_cents} cents",
            reason="balance_limit",
        )
    account.free_cents += amount_cents
    account.exhausted = False
    account.low = account.free_cents < account.low_balance_threshold_cents
    session.execute(
        insert(LedgerEntry).values(
            workspace_id=account.workspace_id,
            kind=kind,
            free_delta_cents=amount_cents,
            reserved_delta_cents=0,
            key=idempotency_key or None,
            created_at=_now(),
        )
    )
    _write_account(session, account)
    return True


def rebuild_balance(session: Session, *, workspace_id: str) -> tuple[int, int]:
    """(free, reserved) summed from the ledger alone: must equal the account row."""
    from sqlalchemy import func

    row = session.execute(
        select(
            func.coalesce(func.sum(LedgerEntry.free_delta_cents), 0),
            func.coalesce(func.sum(LedgerEntry.reserved_delta_cents), 0),
        ).where(LedgerEntry.workspace_id == workspace_id)
    ).one()
    return int(row[0]), int(row[1])
