"""Billing tables: accounts, prices, holds and the immutable ledger."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Boolean, Column, Index, LargeBinary, UniqueConstraint, false, text
from sqlmodel import Field, SQLModel

from shoal.db import new_registry
from shoal.v1 import billing_pb2 as pb

registry = new_registry()


def utcnow() -> datetime:
    return datetime.now(UTC)


class BillingModel(SQLModel, registry=registry):
    pass


class Account(BillingModel, table=True):
    __tablename__ = "accounts"

    workspace_id: str = Field(primary_key=True, max_length=64)
    free_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    reserved_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    max_balance_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    low_balance_threshold_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(default="EUR", max_length=3)
    # Set while free balance is exhausted, so balance_exhausted is published once per episode.
    exhausted: bool = False
    low: bool = False
    # Auto-reload settings live on the account row: the hold transaction already holds its lock,
    # so deciding to fire costs no extra query on the hot path.
    auto_reload_enabled: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    auto_reload_threshold_cents: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default=text("0"))
    )
    auto_reload_amount_cents: int = Field(
        default=0, sa_column=Column(BigInteger, nullable=False, server_default=text("0"))
    )
    updated_at: datetime = Field(default_factory=utcnow)


class Price(BillingModel, table=True):
    __tablename__ = "prices"

    workspace_id: str = Field(primary_key=True, max_length=64)
    channel: int = Field(primary_key=True)
    message_type: int = Field(primary_key=True)
    unit: int = Field(primary_key=True)
    cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow)


class Hold(BillingModel, table=True):
    __tablename__ = "holds"

    workspace_id: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=200)
    amount_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    status: int
    campaign_id: str = Field(default="", max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


# The ledger kinds whose keyed entry must exist once by the ledger's own index: a keyed top-up,
# an auto-reload (its payment key), an adjustment. Literal, so that SQLite, which uses a partial
# index only for a query repeating its condition word for word, can use it (`ledger.top_up`).
# A hold's own entries (HOLD, CAPTURE, RELEASE) exist once through the holds row instead: its
# primary key admits one hold per key, and its status leaves HELD once, both under the account
# lock. Indexing their random keys a second time cost half of the database's work for a send.
KEYED_KINDS = (pb.LEDGER_ENTRY_KIND_TOP_UP, pb.LEDGER_ENTRY_KIND_AUTO_RELOAD, pb.LEDGER_ENTRY_KIND_ADJUSTMENT)
LEDGER_KEYED_KINDS = text(f"kind IN ({', '.join(str(int(k)) for k in KEYED_KINDS)})")


class LedgerEntry(BillingModel, table=True):
    __tablename__ = "ledger"
    __table_args__ = (
        Index(
            "uq_ledger_keyed_kind_key",
            "workspace_id",
            "kind",
            "key",
            unique=True,
            sqlite_where=LEDGER_KEYED_KINDS,
            postgresql_where=LEDGER_KEYED_KINDS,
        ),
        Index("ix_ledger_workspace_id_id", "workspace_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str = Field(max_length=64)
    kind: int
    free_delta_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    reserved_delta_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    key: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow)


class AutoReloadAttempt(BillingModel, table=True):
    """One payment attempt of an auto-reload, written before the payment is called.

    `day` (UTC, YYYY-MM-DD) counts first attempts against the daily cap; a retry points at the
    attempt it retries (`retry_of`) and does not count again. `key` is the payment's idempotency
    key, so re-running an attempt interrupted by a crash never charges twice.
    """

    __tablename__ = "auto_reload_attempts"
    __table_args__ = (
        UniqueConstraint("key", name="uq_auto_reload_attempts_key"),
        Index("ix_auto_reload_attempts_workspace_day", "workspace_id", "day"),
        Index("ix_auto_reload_attempts_status", "status"),
    )

    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str = Field(max_length=64)
    key: str = Field(max_length=200)
    day: str = Field(max_length=10)
    amount_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    # pending | succeeded | failed
    status: str = Field(max_length=16)
    retry_of: int | None = None
    # Set on a failed first attempt: when its one retry is due.
    retry_at: datetime | None = None
    retried: bool = False
    error: str = Field(default="", max_length=500)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class OutboxEvent(BillingModel, table=True):
    """An event written in the transaction that caused it, published after the commit.

    A crash between commit and publish leaves the row unpublished and the background loop sends
    it; the row id is the Nats-Msg-Id, so two senders racing on one row publish it once.
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_published", "published"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=64)
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    published: bool = False
    created_at: datetime = Field(default_factory=utcnow)
