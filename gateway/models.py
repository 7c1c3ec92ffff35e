"""The gateway's own tables (its registry, its database): API keys and outgoing webhooks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from shoal.db import new_registry

registry = new_registry()

# Delivery states (webhook_deliveries.state). Written out because the partial index below (and
# its migration) needs the literal value.
DELIVERY_PENDING = "pending"
DELIVERY_DELIVERED = "delivered"
DELIVERY_FAILED = "failed"


def _pending_only() -> dict[str, Any]:
    clause = text(f"state = '{DELIVERY_PENDING}'")
    return {"sqlite_where": clause, "postgresql_where": clause}


def utcnow() -> datetime:
    return datetime.now(UTC)


class GatewayModel(SQLModel, registry=registry):
    pass


class ApiKey(GatewayModel, table=True):
    """One API key. The secret part is never stored: only its SHA-256 (it has 256 bits of entropy,
    so a slow hash would add nothing but latency on every request)."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=32)
    workspace_id: str = Field(max_length=64, index=True)
    name: str = Field(default="", max_length=200)
    secret_sha256: str = Field(max_length=64)
    # Space separated scope names.
    scopes: str = Field(max_length=500)
    # Space separated campaign ids; empty means every campaign of the workspace.
    campaign_ids: str = Field(default="", max_length=20_000)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class WebhookEndpoint(GatewayModel, table=True):
    """A customer's URL and the events it wants. The signing secret is kept in the clear: signing
    needs it (an HMAC key cannot be hashed like an API key); the API shows it only once."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_workspace", "workspace_id", "id"),)

    id: str = Field(primary_key=True, max_length=32)
    workspace_id: str = Field(max_length=64)
    url: str = Field(max_length=2048)
    description: str = Field(default="", max_length=500)
    # Space separated event names, or "*" for every event of the catalogue.
    events: str = Field(max_length=2000)
    enabled: bool = True
    secret: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class WebhookDelivery(GatewayModel, table=True):
    """One event for one endpoint: the exact body to send and where its attempts stand.

    Unique on (endpoint, event): a redelivered bus message adds nothing. A process owns a row while
    `leased_until` is in the future; `lease_token` fences a holder whose lease ran out (its late
    result matches nothing). `attempts` counts every attempt; `round_attempts` those since the last
    replay, which the retry schedule is indexed by.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_due", "next_attempt_at", **_pending_only()),
        Index("ix_webhook_deliveries_created", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=32)
    workspace_id: str = Field(max_length=64)
    endpoint_id: str = Field(max_length=32)
    event_id: str = Field(max_length=32)
    event: str = Field(max_length=64)
    # The envelope, exactly as POSTed (and signed) on every attempt.
    body: str = Field(sa_column=Column(Text, nullable=False))
    state: str = Field(default=DELIVERY_PENDING, max_length=16)
    attempts: int = 0
    replays: int = 0
    round_attempts: int = 0
    next_attempt_at: datetime | None = None
    leased_until: datetime | None = None
    lease_token: str = Field(default="", max_length=32)
    last_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str = Field(default="", max_length=1000)
    delivered_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class WebhookAttempt(GatewayModel, table=True):
    """One POST of a delivery: when, how long, what came back."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(max_length=32)
    workspace_id: str = Field(max_length=64)
    # 1-based over the delivery's whole life; `replay` is 0 before the first replay.
    number: int
    replay: int = 0
    started_at: datetime
    duration_ms: int
    status_code: int | None = None
    error: str = Field(default="", max_length=1000)
    succeeded: bool
