"""Billing tables: accounts, prices, holds and the immutable ledger."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from shoal.db import new_registry

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


class LedgerEntry(BillingModel, table=True):
    __tablename__ = "ledger"
    __table_args__ = (
        # A keyed entry (a hold, its capture or release, a keyed top-up) exists once.
        UniqueConstraint("workspace_id", "kind", "key", name="uq_ledger_kind_key"),
        Index("ix_ledger_workspace_id_id", "workspace_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str = Field(max_length=64)
    kind: int
    free_delta_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    reserved_delta_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    key: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=utcnow)
