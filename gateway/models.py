"""The gateway's own tables (its registry, its database): API keys."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Field, SQLModel

from shoal.db import new_registry

registry = new_registry()


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
