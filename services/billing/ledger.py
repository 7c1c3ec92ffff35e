"""Balance arithmetic: holds, captures, releases, top-ups and auto-reloads, each written to the ledger.

Every function runs inside the caller's transaction after `lock_account` (`SELECT ... FOR UPDATE`
on PostgreSQL; SQLite has one writer, the database thread), so concurrent batches serialise on
the account row and free balance can never go below zero. The account is read and written with
Core statements into a plain `AccountState`: no ORM object on the hot path, and no second UPDATE
from an ORM flush behind our own.

Flags that make events fire once (DESIGN §3 "Balance"):
- `exhausted`: set by the first hold that finds free balance short; the episode ends (flag
  cleared) when free balance rises again (top-up, release, auto-reload). `balance_exhausted` is
  published when the flag is set, so once per episode, not per item or per batch.
- `low`: set when free balance crosses below the low-balance threshold (`balance_low` published
  then), cleared when it is back at or above it, so the next crossing publishes again.
Events go to the outbox in the same transaction and are published after the commit.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from google.protobuf.message import Message
from sqlalchemy import ARRAY, ColumnElement, String, any_, bindparam, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from services.billing import outbox
from services.billing.models import (
    KEYED_KINDS,
    LEDGER_KEYED_KINDS,
    Account,
    AutoReloadAttempt,
    Hold,
    LedgerEntry,
    Price,
)
from services.billing.pricing import DEFAULT_PRICES, PriceKey, price_of
from shoal.errors import InvalidArgument
from shoal.v1 import billing_pb2 as pb
from shoal.v1 import events_pb2

HELD, INSUFFICIENT, CAPTURED, RELEASED, UNKNOWN = (
    pb.HOLD_STATUS_HELD,
    pb.HOLD_STATUS_INSUFFICIENT_BALANCE,
    pb.HOLD_STATUS_CAPTURED,
    pb.HOLD_STATUS_RELEASED,
    pb.HOLD_STATUS_UNSPECIFIED,
)

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"

KIND_EXHAUSTED = "balance_exhausted"
# A shortage inside an exhausted episode: balance_exhausted (customers' webhooks) is once per
# episode, but the campaign service must hear it, or a campaign resumed without a top-up whose
# holds fail again stays RUNNING without sending.
KIND_SHORT = "balance_short"
KIND_LOW = "balance_low"
# Subject tokens cannot contain '.', so "billing.auto_reload.succeeded" of the product page is
# published on shoal.events.billing.auto_reload_succeeded (and _failed).
KIND_RELOAD_SUCCEEDED = "auto_reload_succeeded"
KIND_RELOAD_FAILED = "auto_reload_failed"

_ACCOUNTS = Account.__table__  # type: ignore[attr-defined]
_A = _ACCOUNTS.c
_ACCOUNT_COLUMNS = (
    _A.workspace_id,
    _A.free_cents,
    _A.reserved_cents,
    _A.max_balance_cents,
    _A.low_balance_threshold_cents,
    _A.currency,
    _A.exhausted,
    _A.low,
    _A.auto_reload_enabled,
    _A.auto_reload_threshold_cents,
    _A.auto_reload_amount_cents,
)


# Every hold and settle call runs these three: built once, with bound parameters, and executed
# on the connection, not the session (on the table, not the mapped class: an ORM bulk UPDATE
# first tries to synchronise the session's identity map, which has nothing to find here).
# Building the statements on each call cost about as much as running them.
_LOCK_ACCOUNT = select(*_ACCOUNT_COLUMNS).where(_A.workspace_id == bindparam("ws")).with_for_update()
# The SET clause comes from the parameters' names (every column but the key).
_WRITE_ACCOUNT = update(_ACCOUNTS).where(_A.workspace_id == bindparam("ws"))
_P = Price.__table__.c  # type: ignore[attr-defined]
_LOAD_PRICES = select(_P.channel, _P.message_type, _P.unit, _P.cents).where(
    _P.workspace_id == bindparam("ws")
)


@dataclass
class AccountState:
    """The account row of one workspace, as read under its lock."""

    workspace_id: str
    free_cents: int
    reserved_cents: int
    max_balance_cents: int
    low_balance_threshold_cents: int
    currency: str = "EUR"
    exhausted: bool = False
    low: bool = False
    auto_reload_enabled: bool = False
    auto_reload_threshold_cents: int = 0
    auto_reload_amount_cents: int = 0

    @property
    def total_cents(self) -> int:
        return self.free_cents + self.reserved_cents


@dataclass(frozen=True)
class Defaults:
    """What a workspace's account starts with the first time it is touched."""

    max_balance_cents: int
    low_threshold_cents: int


class HoldRequest(NamedTuple):
    # NamedTuples, not dataclasses: thousands are built per second on the hot path.
    key: str
    channel: int
    message_type: int
    unit: int
    units: int
    campaign_id: str = ""


class HoldAnswer(NamedTuple):
    key: str
    status: int
    amount_cents: int


@dataclass
class BatchOutcome:
    answers: list[HoldAnswer]
    account: AccountState
    events: int = 0
    # An auto-reload attempt recorded by this batch, for the caller to run after the commit.
    reload_attempt_id: int | None = None
    short_campaigns: list[str] = field(default_factory=list)


def sqlite_timestamp(now: datetime) -> str:
    """A UTC time in SQLAlchemy's SQLite storage format (what a bound UTCDateTime becomes)."""
    return now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


# The hot path writes hundreds of rows per batch. A Core executemany spends more time building
# per-row parameters (and, through psycopg, one statement per row) than the database spends
# storing them, so these two inserts go to the driver directly: on SQLite C-level statements
# of tuples, on PostgreSQL one INSERT ... SELECT FROM unnest(arrays), one round trip.
_HOLDS_SQLITE = (
    "INSERT INTO holds (workspace_id, key, amount_cents, status, campaign_id, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_HOLDS_PG = text(
    "INSERT INTO holds (workspace_id, key, amount_cents, status, campaign_id, created_at, updated_at) "
    "SELECT :ws, k, a, :status, c, :now, :now "
    "FROM unnest(CAST(:keys AS text[]), CAST(:amounts AS bigint[]), CAST(:campaigns AS text[])) AS t(k, a, c)"
)
# Ledger rows go in as multi-row VALUES rather than an executemany: the ledger's indexes are
# sequential, so per-row statement stepping (reset, bind, step, the GIL released and taken back)
# cost more than storing the row; one statement per chunk took ~2.5 us per send off a hold and
# its capture. The holds insert stays an executemany: its random key index dominates there, and
# a multi-row VALUES measured no faster. 150 rows x 6 values stays under 999, the smallest
# variable limit an SQLite build may have.
_LEDGER_SQLITE_CHUNK = 150


@functools.cache
def _ledger_sqlite(rows: int) -> str:
    return (
        "INSERT INTO ledger (workspace_id, kind, free_delta_cents, reserved_delta_cents, key, created_at) "
        "VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)
    )


_LEDGER_PG = text(
    "INSERT INTO ledger (workspace_id, kind, free_delta_cents, reserved_delta_cents, key, created_at) "
    "SELECT :ws, :kind, f, r, k, :now "
    "FROM unnest(CAST(:keys AS text[]), CAST(:free AS bigint[]), CAST(:reserved AS bigint[])) AS t(k, f, r)"
)


def _key_in(session: Session, keys: list[str]) -> ColumnElement[bool]:
    # PostgreSQL: one array parameter (`key = ANY(:keys)`); 500 separate binds cost more to
    # render and parse than the lookup itself. SQLite has no arrays and binds cheaply.
    if session.get_bind().dialect.name == "postgresql":
        return Hold.key == any_(bindparam("keys", keys, type_=ARRAY(String)))  # type: ignore[arg-type]
    return Hold.key.in_(keys)  # type: ignore[attr-defined,no-any-return]


_HOLDS_BY_KEY_SQLITE = (
    "SELECT key, status, amount_cents FROM holds "
    "WHERE workspace_id = ? AND key IN (SELECT value FROM json_each(?))"
)


def _holds_by_key(session: Session, ws: str, keys: list[str]) -> list[tuple[str, int, int]]:
    """(key, status, amount_cents) of the workspace's holds among `keys`."""
    if session.get_bind().dialect.name == "sqlite":
        # One JSON parameter instead of 500 expanded binds: SQLAlchemy's rendering of a large
        # IN list cost about as much as the indexed lookup itself.
        found = session.connection().exec_driver_sql(_HOLDS_BY_KEY_SQLITE, (ws, json.dumps(keys))).all()
        return [(r[0], r[1], r[2]) for r in found]
    rows = session.execute(
        select(Hold.key, Hold.status, Hold.amount_cents).where(
            Hold.workspace_id == ws, _key_in(session, keys)
        )
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def bulk_insert_holds(session: Session, ws: str, now: datetime, rows: list[tuple[str, int, str]]) -> None:
    """Insert HELD holds: rows of (key, amount_cents, campaign_id)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        keys, amounts, campaigns = (list(col) for col in zip(*rows, strict=True))
        conn.execute(
            _HOLDS_PG,
            {"ws": ws, "status": HELD, "now": now, "keys": keys, "amounts": amounts, "campaigns": campaigns},
        )
        return
    stamp = sqlite_timestamp(now)
    conn.exec_driver_sql(_HOLDS_SQLITE, [(ws, k, a, HELD, c, stamp, stamp) for k, a, c in rows])


def bulk_insert_ledger(
    session: Session, ws: str, kind: int, now: datetime, rows: list[tuple[str, int, int]]
) -> None:
    """Insert keyed ledger entries of one kind: rows of (key, free_delta, reserved_delta)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        keys, free, reserved = (list(col) for col in zip(*rows, strict=True))
        conn.execute(
            _LEDGER_PG,
            {"ws": ws, "kind": kind, "now": now, "keys": keys, "free": free, "reserved": reserved},
        )
        return
    stamp = sqlite_timestamp(now)
    for start in range(0, len(rows), _LEDGER_SQLITE_CHUNK):
        chunk = rows[start : start + _LEDGER_SQLITE_CHUNK]
        values = tuple(v for k, f, r in chunk for v in (ws, kind, f, r, k, stamp))
        conn.exec_driver_sql(_ledger_sqlite(len(chunk)), values)


def _insert_ignoring_conflict(session: Session, table: object, rows: list[dict[str, object]]) -> None:
    # Two first calls for a new workspace race to create its account: the loser must not fail.
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    session.execute(module.insert(table).on_conflict_do_nothing(), rows)  # type: ignore[arg-type]


def lock_account(session: Session, *, workspace_id: str, defaults: Defaults, now: datetime) -> AccountState:
    """The workspace's account, created with default prices on first use, locked for this transaction."""
    row = session.connection().execute(_LOCK_ACCOUNT, {"ws": workspace_id}).first()
    if row is None:
        _insert_ignoring_conflict(
            session,
            Account.__table__,
            [
                {
                    "workspace_id": workspace_id,
                    "free_cents": 0,
                    "reserved_cents": 0,
                    "max_balance_cents": defaults.max_balance_cents,
                    "low_balance_threshold_cents": defaults.low_threshold_cents,
                    "currency": "EUR",
                    "exhausted": False,
                    "low": False,
                    "auto_reload_enabled": False,
                    "auto_reload_threshold_cents": 0,
                    "auto_reload_amount_cents": 0,
                    "updated_at": now,
                }
            ],
        )
        _insert_ignoring_conflict(
            session,
            Price.__table__,
            [
                {
                    "workspace_id": workspace_id,
                    "channel": c,
                    "message_type": m,
                    "unit": u,
                    "cents": cents,
                    "updated_at": now,
                }
                for (c, m, u), cents in DEFAULT_PRICES.items()
            ],
        )
        row = session.connection().execute(_LOCK_ACCOUNT, {"ws": workspace_id}).one()
    return AccountState(*row)


def read_account(session: Session, *, workspace_id: str, defaults: Defaults, now: datetime) -> AccountState:
    """The account for a read-only answer: no row lock, so reads never queue behind hold batches."""
    row = session.execute(select(*_ACCOUNT_COLUMNS).where(_A.workspace_id == workspace_id)).first()
    if row is None:
        return lock_account(session, workspace_id=workspace_id, defaults=defaults, now=now)
    return AccountState(*row)


def write_account(session: Session, account: AccountState, now: datetime) -> None:
    session.connection().execute(
        _WRITE_ACCOUNT,
        {
            "ws": account.workspace_id,
            "free_cents": account.free_cents,
            "reserved_cents": account.reserved_cents,
            "exhausted": account.exhausted,
            "low": account.low,
            "max_balance_cents": account.max_balance_cents,
            "low_balance_threshold_cents": account.low_balance_threshold_cents,
            "auto_reload_enabled": account.auto_reload_enabled,
            "auto_reload_threshold_cents": account.auto_reload_threshold_cents,
            "auto_reload_amount_cents": account.auto_reload_amount_cents,
            "updated_at": now,
        },
    )


def load_prices(session: Session, *, workspace_id: str) -> dict[PriceKey, int]:
    rows = session.connection().execute(_LOAD_PRICES, {"ws": workspace_id}).all()
    return {(r[0], r[1], r[2]): r[3] for r in rows}


def _balance_event(account: AccountState, now: datetime, *, campaign_ids: Sequence[str] = ()) -> Message:
    event = events_pb2.BalanceEvent(
        workspace_id=account.workspace_id,
        free_cents=account.free_cents,
        threshold_cents=account.low_balance_threshold_cents,
        campaign_ids=list(campaign_ids),
    )
    event.time.FromDatetime(now)
    return event


def update_flags(
    session: Session,
    account: AccountState,
    now: datetime,
    *,
    short: bool = False,
    credited: bool = False,
    campaign_ids: Sequence[str] = (),
) -> int:
    """Move the exhausted/low flags after a balance change; outbox their events. Returns how many."""
    events = 0
    if credited:
        # Free balance rose: the exhausted episode is over, the next shortage is a new one.
        account.exhausted = False
    if short and not account.exhausted:
        account.exhausted = True
        outbox.add(session, KIND_EXHAUSTED, _balance_event(account, now, campaign_ids=campaign_ids), now)
        events += 1
    elif short:
        outbox.add(session, KIND_SHORT, _balance_event(account, now, campaign_ids=campaign_ids), now)
        events += 1
    threshold = account.low_balance_threshold_cents
    below = threshold > 0 and account.free_cents < threshold
    if below and not account.low:
        account.low = True
        outbox.add(session, KIND_LOW, _balance_event(account, now), now)
        events += 1
    elif not below:
        account.low = False
    return events


def hold_batch(
    session: Session,
    *,
    account: AccountState,
    items: Sequence[HoldRequest],
    now: datetime,
    daily_reload_cap: int,
) -> BatchOutcome:
    """Hold each item whole or answer INSUFFICIENT_BALANCE; a key already held answers as before.

    INSUFFICIENT_BALANCE is not remembered: the same key must be able to hold after a top-up
    (the execution stays pending and retries it on resume).
    """
    ws = account.workspace_id
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):
        raise InvalidArgument.of("items.key", "a key appears twice in one batch")
    existing = {row[0]: HoldAnswer(row[0], row[1], row[2]) for row in _holds_by_key(session, ws, keys)}
    prices = load_prices(session, workspace_id=ws)
    answers: list[HoldAnswer] = []
    new_holds: list[tuple[str, int, str]] = []
    short_campaigns: list[str] = []
    short = False
    for index, item in enumerate(items):
        known = existing.get(item.key)
        if known is not None:
            answers.append(known)
            continue
        amount = price_of(prices, item.channel, item.message_type, item.unit, item.units)
        if amount is None:
            raise InvalidArgument.of(
                f"items[{index}]",
                f"no price for channel {item.channel}, message type {item.message_type}, unit {item.unit}",
            )
        if account.free_cents < amount:
            short = True
            answers.append(HoldAnswer(item.key, INSUFFICIENT, amount))
            if item.campaign_id and item.campaign_id not in short_campaigns:
                short_campaigns.append(item.campaign_id)
            continue
        account.free_cents -= amount
        account.reserved_cents += amount
        answers.append(HoldAnswer(item.key, HELD, amount))
        new_holds.append((item.key, amount, item.campaign_id))
    outcome = BatchOutcome(answers=answers, account=account, short_campaigns=short_campaigns)
    if not new_holds and not short:
        # Pure replay: nothing changed, nothing to write.
        return outcome
    if new_holds:
        bulk_insert_holds(session, ws, now, new_holds)
        bulk_insert_ledger(session, ws, pb.LEDGER_ENTRY_KIND_HOLD, now, [(k, -a, a) for k, a, _ in new_holds])
    outcome.events = update_flags(session, account, now, short=short, campaign_ids=short_campaigns)
    outcome.reload_attempt_id = maybe_fire_auto_reload(session, account, now, daily_cap=daily_reload_cap)
    write_account(session, account, now)
    return outcome


# Capture or release in one statement: only HELD rows move, and they come back with their amounts,
# so the common call (every key held) needs no separate lookup. Under the account lock, so nothing
# moves a hold between this UPDATE and the lookup of the keys it did not move.
_SETTLE_SQLITE = (
    "UPDATE holds SET status = ?, updated_at = ? "
    "WHERE workspace_id = ? AND status = ? AND key IN (SELECT value FROM json_each(?)) "
    "RETURNING key, amount_cents"
)
_SETTLE_PG = text(
    "UPDATE holds SET status = :target, updated_at = :now "
    "WHERE workspace_id = :ws AND status = :held AND key = ANY(CAST(:keys AS text[])) "
    "RETURNING key, amount_cents"
)


def _settle_held(session: Session, ws: str, keys: list[str], target: int, now: datetime) -> dict[str, int]:
    """Move the workspace's HELD holds among `keys` to `target`: {key: amount_cents} of those moved."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            _SETTLE_PG, {"target": target, "now": now, "ws": ws, "held": HELD, "keys": keys}
        ).all()
    else:
        rows = conn.exec_driver_sql(
            _SETTLE_SQLITE, (target, sqlite_timestamp(now), ws, HELD, json.dumps(keys))
        ).all()
    return {r[0]: r[1] for r in rows}


def settle_batch(
    session: Session, *, account: AccountState, keys: Sequence[str], capture: bool, now: datetime
) -> tuple[list[HoldAnswer], int]:
    """Capture (message sent) or release (message failed) held amounts; idempotent per key.

    A key already captured or released answers its final status and moves nothing; a key with
    no hold answers UNSPECIFIED (0 cents). Returns the answers and how many events were outboxed.
    """
    ws = account.workspace_id
    target = CAPTURED if capture else RELEASED
    moved = _settle_held(session, ws, list(keys), target, now)
    # Keys the UPDATE did not move (already settled, unknown): answered from their rows as they are.
    rest = [k for k in keys if k not in moved]
    others = {r[0]: (r[1], r[2]) for r in _holds_by_key(session, ws, rest)} if rest else {}
    answers: list[HoldAnswer] = []
    entries: list[tuple[str, int, int]] = []
    entered: set[str] = set()
    released = 0
    for key in keys:
        amount = moved.get(key)
        if amount is None:
            known = others.get(key)
            answers.append(HoldAnswer(key, known[0], known[1]) if known else HoldAnswer(key, UNKNOWN, 0))
            continue
        answers.append(HoldAnswer(key, target, amount))
        if key not in entered:
            # The same key twice in one call moved once: one ledger entry, in the call's order.
            entered.add(key)
            account.reserved_cents -= amount
            if not capture:
                account.free_cents += amount
                released += amount
            entries.append((key, 0 if capture else amount, -amount))
    events = 0
    if moved:
        kind = pb.LEDGER_ENTRY_KIND_CAPTURE if capture else pb.LEDGER_ENTRY_KIND_RELEASE
        bulk_insert_ledger(session, ws, kind, now, entries)
        events = update_flags(session, account, now, credited=released > 0)
        write_account(session, account, now)
    return answers, events


def top_up(
    session: Session,
    *,
    account: AccountState,
    amount_cents: int,
    idempotency_key: str,
    kind: int,
    now: datetime,
    enforce_limit: bool = True,
) -> tuple[bool, int]:
    """Credit free balance. Returns (credited, events): credited is False when this idempotency
    key was already credited (the call is a replay and changes nothing)."""
    if idempotency_key:
        if kind not in KEYED_KINDS:
            # Its key would not be unique in the ledger: a replay could credit twice.
            raise ValueError(f"ledger kind {kind} does not take an idempotency key")
        seen = session.execute(
            select(LedgerEntry.id).where(
                LedgerEntry.workspace_id == account.workspace_id,
                LedgerEntry.kind == kind,
                LedgerEntry.key == idempotency_key,
                # Word for word the partial unique index's condition, so the lookup uses it.
                LEDGER_KEYED_KINDS,
            )
        ).first()
        if seen is not None:
            return False, 0
    if enforce_limit and account.total_cents + amount_cents > account.max_balance_cents:
        raise InvalidArgument.of(
            "amount_cents",
            f"balance would exceed the account maximum of {account.max_balance_cents} cents "
            f"(now {account.total_cents})",
            reason="balance_limit",
        )
    account.free_cents += amount_cents
    session.execute(
        insert(LedgerEntry).values(
            workspace_id=account.workspace_id,
            kind=kind,
            free_delta_cents=amount_cents,
            reserved_delta_cents=0,
            key=idempotency_key or None,
            created_at=now,
        )
    )
    events = update_flags(session, account, now, credited=True)
    write_account(session, account, now)
    return True, events


# -- auto-reload ---------------------------------------------------------------------------------


def maybe_fire_auto_reload(
    session: Session, account: AccountState, now: datetime, *, daily_cap: int
) -> int | None:
    """Record a pending auto-reload attempt when free balance is below the trigger; its id, or None.

    Runs in the hold transaction, under the account lock, so concurrent batches never fire twice;
    the payment itself is called after the commit. One reload is outstanding at a time (a pending
    attempt, or a failed one waiting for its retry), and at most `daily_cap` fire per UTC day.
    A reload that would take the balance over the account maximum does not fire.
    """
    if not account.auto_reload_enabled or account.free_cents >= account.auto_reload_threshold_cents:
        return None
    if account.total_cents + account.auto_reload_amount_cents > account.max_balance_cents:
        return None
    t = AutoReloadAttempt.__table__.c  # type: ignore[attr-defined]
    outstanding = session.execute(
        select(func.count())
        .select_from(AutoReloadAttempt)
        .where(
            t.workspace_id == account.workspace_id,
            (t.status == PENDING) | ((t.status == FAILED) & t.retry_of.is_(None) & t.retried.is_(False)),
        )
    ).scalar_one()
    if outstanding:
        return None
    day = now.date().isoformat()
    fired_today = session.execute(
        select(func.count())
        .select_from(AutoReloadAttempt)
        .where(t.workspace_id == account.workspace_id, t.day == day, t.retry_of.is_(None))
    ).scalar_one()
    if fired_today >= daily_cap:
        return None
    return insert_attempt(
        session,
        workspace_id=account.workspace_id,
        amount_cents=account.auto_reload_amount_cents,
        now=now,
        key=f"auto_reload:{uuid.uuid4().hex}",
        retry_of=None,
    )


def insert_attempt(
    session: Session, *, workspace_id: str, amount_cents: int, now: datetime, key: str, retry_of: int | None
) -> int:
    result = session.execute(
        insert(AutoReloadAttempt)
        .values(
            workspace_id=workspace_id,
            key=key,
            day=now.date().isoformat(),
            amount_cents=amount_cents,
            status=PENDING,
            retry_of=retry_of,
            retried=False,
            error="",
            created_at=now,
            updated_at=now,
        )
        .returning(AutoReloadAttempt.__table__.c.id)  # type: ignore[attr-defined]
    )
    return int(result.scalar_one())


@dataclass(frozen=True)
class Attempt:
    id: int
    workspace_id: str
    key: str
    amount_cents: int
    status: str
    retry_of: int | None


def get_attempt(session: Session, attempt_id: int) -> Attempt | None:
    t = AutoReloadAttempt.__table__.c  # type: ignore[attr-defined]
    row = session.execute(
        select(t.id, t.workspace_id, t.key, t.amount_cents, t.status, t.retry_of).where(t.id == attempt_id)
    ).first()
    return Attempt(*row) if row is not None else None


def finish_attempt(
    session: Session,
    *,
    attempt: Attempt,
    defaults: Defaults,
    succeeded: bool,
    error: str,
    now: datetime,
    retry_after: timedelta,
) -> int:
    """Record a payment's outcome; on success credit free balance. Returns events outboxed.

    Idempotent: only a still-pending attempt moves, so a second finisher (a recovery racing the
    original) changes nothing. The credit skips the maximum-balance check: the customer has paid.
    """
    account = lock_account(session, workspace_id=attempt.workspace_id, defaults=defaults, now=now)
    t = AutoReloadAttempt.__table__.c  # type: ignore[attr-defined]
    first_failure = not succeeded and attempt.retry_of is None
    moved = session.execute(
        update(AutoReloadAttempt)
        .where(t.id == attempt.id, t.status == PENDING)
        .values(
            status=SUCCEEDED if succeeded else FAILED,
            error=error[:500],
            retry_at=now + retry_after if first_failure else None,
            updated_at=now,
        )
    ).rowcount
    if not moved:
        return 0
    events = 0
    if succeeded:
        _, events = top_up(
            session,
            account=account,
            amount_cents=attempt.amount_cents,
            idempotency_key=attempt.key,
            kind=pb.LEDGER_ENTRY_KIND_AUTO_RELOAD,
            now=now,
            enforce_limit=False,
        )
    result = events_pb2.AutoReloadResult(
        workspace_id=attempt.workspace_id, amount_cents=attempt.amount_cents, succeeded=succeeded, error=error
    )
    result.time.FromDatetime(now)
    outbox.add(session, KIND_RELOAD_SUCCEEDED if succeeded else KIND_RELOAD_FAILED, result, now)
    return events + 1


def due_retries(session: Session, *, now: datetime) -> list[int]:
    """Turn failed first attempts whose retry is due into pending retry attempts; their ids."""
    t = AutoReloadAttempt.__table__.c  # type: ignore[attr-defined]
    due = session.execute(
        select(t.id, t.workspace_id, t.key, t.amount_cents).where(
            t.status == FAILED, t.retry_of.is_(None), t.retried.is_(False), t.retry_at <= now
        )
    ).all()
    ids = []
    for attempt_id, ws, key, amount in due:
        claimed = session.execute(
            update(AutoReloadAttempt)
            .where(t.id == attempt_id, t.retried.is_(False))
            .values(retried=True, updated_at=now)
        ).rowcount
        if claimed:
            ids.append(
                insert_attempt(
                    session,
                    workspace_id=ws,
                    amount_cents=amount,
                    now=now,
                    key=f"{key}:retry",
                    retry_of=attempt_id,
                )
            )
    return ids


def pending_attempts(session: Session) -> list[int]:
    t = AutoReloadAttempt.__table__.c  # type: ignore[attr-defined]
    return list(session.execute(select(t.id).where(t.status == PENDING).order_by(t.id)).scalars())


def rebuild_balance(session: Session, *, workspace_id: str) -> tuple[int, int]:
    """(free, reserved) summed from the ledger alone: must equal the account row."""
    row = session.execute(
        select(
            func.coalesce(func.sum(LedgerEntry.free_delta_cents), 0),
            func.coalesce(func.sum(LedgerEntry.reserved_delta_cents), 0),
        ).where(LedgerEntry.workspace_id == workspace_id)
    ).one()
    return int(row[0]), int(row[1])
