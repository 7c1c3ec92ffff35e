"""Campaign tables: campaigns, flow versions, runs, state transitions (audit), trigger keys."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, Index, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from shoal.db import new_registry

registry = new_registry()


def utcnow() -> datetime:
    return datetime.now(UTC)


class CampaignModel(SQLModel, registry=registry):
    pass


class Campaign(CampaignModel, table=True):
    __tablename__ = "campaigns"
    __table_args__ = (
        Index("ix_campaigns_workspace_state", "workspace_id", "state"),
        Index("ix_campaigns_state_due", "state", "due_at"),
    )

    id: str = Field(primary_key=True, max_length=64)
    workspace_id: str = Field(max_length=64)
    name: str = Field(max_length=200)
    segment_id: str = Field(default="", max_length=64)
    trigger: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # "manual", "scheduled", "event", "api" (the trigger's oneof case), for queries.
    trigger_kind: str = Field(max_length=16)
    flow_version: int = 1
    state: int
    current_run_id: str = Field(default="", max_length=64)
    # Providers the flow's SENDs use (comma separated), so a breaker event finds its campaigns.
    providers: str = Field(default="", max_length=500)
    due_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class FlowVersion(CampaignModel, table=True):
    __tablename__ = "flow_versions"

    campaign_id: str = Field(primary_key=True, max_length=64)
    version: int = Field(primary_key=True)
    flow: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class CampaignRun(CampaignModel, table=True):
    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_campaign", "campaign_id", "started_at"),)

    id: str = Field(primary_key=True, max_length=64)
    workspace_id: str = Field(max_length=64)
    campaign_id: str = Field(max_length=64)
    flow_version: int
    state: int
    idempotency_key: str = Field(default="", max_length=200)
    # Expected cost of one contact through the flow, for the remaining-cost estimate.
    cost_per_contact_cents: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    # Last progress seen from the execution service.
    counts: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    sent: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    started_at: datetime = Field(default_factory=utcnow)
    ended_at: datetime | None = None


class Transition(CampaignModel, table=True):
    __tablename__ = "transitions"
    __table_args__ = (Index("ix_transitions_campaign", "campaign_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str = Field(max_length=64)
    campaign_id: str = Field(max_length=64)
    from_state: int
    to_state: int
    actor: str = Field(max_length=200)
    reason: str = Field(default="", max_length=1000)
    run_id: str = Field(default="", max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class TriggerKey(CampaignModel, table=True):
    __tablename__ = "trigger_keys"
    __table_args__ = (UniqueConstraint("campaign_id", "key", name="uq_trigger_keys_campaign_key"),)

    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str = Field(max_length=64)
    campaign_id: str = Field(max_length=64)
    key: str = Field(max_length=200)
    run_id: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
