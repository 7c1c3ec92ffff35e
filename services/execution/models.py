"""Execution tables: runs, executions (one per contact per run), sends (one per execution per SEND).

The executions row is the truth about a contact's progress; the JetStream step message is only
the nudge to work on it. Workers move rows with compare-and-set on (state, step_seq).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Index, LargeBinary, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from shoal.db import new_registry

registry = new_registry()

# EXECUTION_STATE_PENDING and EXECUTION_STATE_PROCESSING of shoal.v1.ExecutionState, written out
# because index definitions (and their migration) need literal values.
PENDING_STATE = 1
PROCESSING_STATE = 2


def _where(state: int) -> dict[str, Any]:
    clause = text(f"state = {state}")
    return {"sqlite_where": clause, "postgresql_where": clause}


def utcnow() -> datetime:
    return datetime.now(UTC)


class ExecutionModel(SQLModel, registry=registry):
    pass


class Run(ExecutionModel, table=True):
    __tablename__ = "runs"

    id: str = Field(primary_key=True, max_length=64)
    workspace_id: str = Field(max_length=64, index=True)
    campaign_id: str = Field(max_length=64, index=True)
    flow_version: int = 0
    flow: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    segment_id: str = Field(default="", max_length=64)
    # Explicit recipients (API trigger), JSON list; empty when the segment is the audience.
    recipients: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    # Trigger payload for `data.*` template variables, JSON object.
    data: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    open_ended: bool = False
    fanout_cursor: str = Field(default="", max_length=64)
    fanout_done: bool = False
    fanout_owner: str = Field(default="", max_length=64)
    fanout_lease_until: datetime | None = None
    # Counters moved in the same transaction as the executions they count.
    pending: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    processing: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    completed: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    failed: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    skipped: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    sent: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Execution(ExecutionModel, table=True):
    __tablename__ = "executions"
    # Every index that the timer loop needs is partial: it holds only the pending (or processing)
    # rows it searches. A full (state, ...) index moves every row on each state change, and each
    # execution changes state twice per step; a partial index only drops a row that leaves it, and
    # finished executions are in none. The queries compare the state as a literal
    # (`repo.state_is`), which is what lets SQLite and PostgreSQL match the index's WHERE.
    __table_args__ = (
        UniqueConstraint("run_id", "contact_id", "entry", name="uq_executions_run_contact_entry"),
        Index("ix_executions_campaign", "campaign_id"),
        Index("ix_executions_pending_wake", "wake_at", **_where(PENDING_STATE)),
        Index("ix_executions_pending_nudge", "nudge_at", **_where(PENDING_STATE)),
        # Resume and timer nudges page a campaign's pending executions by this key. Not by id:
        # ids are hashes, so each of the 1,000 rows a fan-out page inserts, or a batch claims,
        # landed on its own index page (~570 pages written per 1,000 rows, a third of the claim's
        # and the insert's database CPU). Fan-out pages and batches follow contact order, so
        # under this key they touch a few neighbouring pages.
        Index(
            "ix_executions_pending_run_contact",
            "campaign_id",
            "run_id",
            "contact_id",
            "entry",
            **_where(PENDING_STATE),
        ),
        Index("ix_executions_processing_lease", "lease_until", **_where(PROCESSING_STATE)),
    )

    id: str = Field(primary_key=True, max_length=64)
    workspace_id: str = Field(max_length=64)
    campaign_id: str = Field(max_length=64)
    run_id: str = Field(max_length=64)
    contact_id: str = Field(max_length=64)
    # Re-entry number for event-triggered campaigns that allow it; 0 otherwise.
    entry: int = 0
    state: int
    node_id: str = Field(max_length=64)
    step_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    reason: str = Field(default="", max_length=500)
    ab_variant: str = Field(default="", max_length=500)
    # WAIT: when the execution continues. NULL when it is not parked at a timer.
    wake_at: datetime | None = None
    # Safety net: a pending execution whose step message was lost (a publish that failed, a
    # crash between commit and publish) is nudged again at this time, if still pending.
    nudge_at: datetime | None = None
    lease_until: datetime | None = None
    # W3C traceparent of the execution's trace, so a WAIT of hours continues the same trace.
    traceparent: str = Field(default="", max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Send(ExecutionModel, table=True):
    __tablename__ = "sends"
    # No index on execution_id: an execution's sends are found by their keys (repo.sends_of).
    __table_args__ = (Index("ix_sends_run", "run_id"),)

    # "execution_id:node_id": unique, so no execution sends twice from one node.
    key: str = Field(primary_key=True, max_length=140)
    workspace_id: str = Field(max_length=64)
    execution_id: str = Field(max_length=64)
    run_id: str = Field(max_length=64)
    campaign_id: str = Field(max_length=64)
    node_id: str = Field(max_length=64)
    channel: int
    provider: str = Field(max_length=32)
    provider_message_id: str = Field(default="", max_length=128)
    status: int
    billing_unit: int = 0
    units: int = 1
    cost_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    # W3C traceparent of the execution's span that sent it (empty when not traced): a receipt
    # for this send links to it, from its own trace.
    traceparent: str = Field(default="", max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
