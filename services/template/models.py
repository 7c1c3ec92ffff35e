"""Template tables: one row per template, one immutable row per version."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, Index, Text
from sqlmodel import Field, SQLModel

from shoal.db import new_registry

registry = new_registry()


def utcnow() -> datetime:
    return datetime.now(UTC)


class TemplateModel(SQLModel, registry=registry):
    pass


class TemplateRow(TemplateModel, table=True):
    __tablename__ = "templates"
    __table_args__ = (
        # ListTemplates pages newest first within a workspace.
        Index("ix_templates_workspace_seq", "workspace_id", "seq"),
    )

    # Insertion order, used as the page cursor (ids are random).
    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(max_length=40, unique=True)
    workspace_id: str = Field(max_length=64)
    name: str = Field(max_length=200)
    channel: int
    message_type: int
    latest_version: int
    # State of the latest version, kept here so the list filters without a join.
    latest_state: int
    # Highest PUBLISHED version, 0 when none: what "latest published" resolves to.
    published_version: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class VersionRow(TemplateModel, table=True):
    __tablename__ = "template_versions"

    workspace_id: str = Field(primary_key=True, max_length=64)
    template_id: str = Field(primary_key=True, max_length=40)
    version: int = Field(primary_key=True)
    # Content and variables never change after insert; only state, reason and times move.
    state: int
    content: str = Field(sa_column=Column(Text, nullable=False))
    variables: str = Field(sa_column=Column(Text, nullable=False))
    rejection_reason: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    created_at: datetime = Field(default_factory=utcnow)
    published_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)
