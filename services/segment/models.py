"""Segment tables: contacts with their tags and typed fields, consent, events, capabilities, segments.

Reads and writes take different shapes on purpose:
- `contacts.tags_json` / `contacts.fields_json` are the contact's tags and custom fields as one JSON
  document each, so a page of members or an eligibility batch is one query without joins.
- `contact_tags` and `contact_fields` hold the same data as indexed rows, so a segment filter finds
  "has tag X" or "fields.plan = 'gold'" through an index on (workspace_id, name, value, contact_id)
  on SQLite and PostgreSQL alike. `repo.py` is the only writer and keeps both shapes in step.
- `consents` is the append-only history; `consent_current` is the latest record per
  (contact, channel, message type), so eligibility and filters never scan history.
Every table carries workspace_id and every query filters by it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Column, DateTime, Float, Index, LargeBinary, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from shoal.db import new_registry

registry = new_registry()


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(*, nullable: bool = False, index: bool = False) -> Column[datetime]:
    return Column(DateTime(timezone=True), nullable=nullable, index=index)


class SegmentModel(SQLModel, registry=registry):
    pass


class Contact(SegmentModel, table=True):
    __tablename__ = "contacts"
    __table_args__ = (
        # external_id is unique per workspace; NULLs (no external id) never collide.
        UniqueConstraint("workspace_id", "external_id", name="uq_contacts_workspace_external_id"),
        Index("ix_contacts_workspace_id_id", "workspace_id", "id"),
        Index("ix_contacts_workspace_email", "workspace_id", "email"),
        Index("ix_contacts_workspace_phone", "workspace_id", "phone"),
        Index("ix_contacts_workspace_status", "workspace_id", "status"),
    )

    id: str = Field(primary_key=True, max_length=32)
    workspace_id: str = Field(max_length=64)
    external_id: str | None = Field(default=None, max_length=255)
    email: str | None = Field(default=None, max_length=320)
    phone: str | None = Field(default=None, max_length=32)
    first_name: str | None = Field(default=None, max_length=255)
    last_name: str | None = Field(default=None, max_length=255)
    status: int
    tags_json: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    fields_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class ContactTag(SegmentModel, table=True):
    __tablename__ = "contact_tags"
    __table_args__ = (Index("ix_contact_tags_workspace_tag", "workspace_id", "tag", "contact_id"),)

    contact_id: str = Field(primary_key=True, max_length=32)
    tag: str = Field(primary_key=True, max_length=64)
    workspace_id: str = Field(max_length=64)


def _value_index(kind: str) -> Index:
    """(workspace_id, name, <kind>_value, contact_id) over the rows holding a value of that kind.

    Partial: a row has exactly one value column set, so each row is in one index, not four.
    Ending with contact_id, a segment count can start from it without reading the table
    (repo.count_audience); filters say "<kind>_value IS NOT NULL", which matches the predicate.
    """
    column = f"{kind}_value"
    where = text(f"{column} IS NOT NULL")
    return Index(
        f"ix_contact_fields_{kind}_value",
        "workspace_id",
        "name",
        column,
        "contact_id",
        sqlite_where=where,
        postgresql_where=where,
    )


class ContactField(SegmentModel, table=True):
    """One typed custom field value; exactly one of the *_value columns is set, per `kind`."""

    __tablename__ = "contact_fields"
    __table_args__ = tuple(_value_index(kind) for kind in ("str", "num", "ts", "bool"))

    contact_id: str = Field(primary_key=True, max_length=32)
    name: str = Field(primary_key=True, max_length=64)
    workspace_id: str = Field(max_length=64)
    kind: str = Field(max_length=16)
    str_value: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    num_value: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    bool_value: bool | None = None
    ts_value: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class ConsentRecord(SegmentModel, table=True):
    """History: one row per change, never updated."""

    __tablename__ = "consents"
    __table_args__ = (Index("ix_consents_workspace_contact", "workspace_id", "contact_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    workspace_id: str = Field(max_length=64)
    contact_id: str = Field(max_length=32)
    channel: int
    message_type: int
    status: int
    source: str = Field(default="", max_length=255)
    proof: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    recorded_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    confirmed_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class ConsentCurrent(SegmentModel, table=True):
    """The latest consent record per (contact, channel, message type)."""

    __tablename__ = "consent_current"
    __table_args__ = (
        Index("ix_consent_current_lookup", "workspace_id", "channel", "message_type", "status", "contact_id"),
    )

    contact_id: str = Field(primary_key=True, max_length=32)
    channel: int = Field(primary_key=True)
    message_type: int = Field(primary_key=True)
    workspace_id: str = Field(max_length=64)
    status: int
    record_id: int = Field(sa_column=Column(BigInteger, nullable=False))


class ContactEvent(SegmentModel, table=True):
    __tablename__ = "contact_events"
    # One index: QueryEvents and a filter's event COUNT both look events up per contact. Every
    # receipt is an insert here, so an index nothing reads is pure cost (migration 5c0e7a2d9b41).
    __table_args__ = (
        Index("ix_contact_events_contact", "workspace_id", "contact_id", "type", "occurred_at"),
    )

    id: str = Field(primary_key=True, max_length=32)
    workspace_id: str = Field(max_length=64)
    contact_id: str = Field(max_length=32)
    type: str = Field(max_length=128)
    occurred_at: datetime = Field(sa_column=_ts())
    properties_json: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    message_id: str = Field(default="", max_length=64)
    campaign_id: str = Field(default="", max_length=64)
    node_id: str = Field(default="", max_length=64)
    run_id: str = Field(default="", max_length=64)
    recorded_at: datetime = Field(default_factory=utcnow, sa_column=_ts())


class Capability(SegmentModel, table=True):
    """Cached RCS capability of an address (E.164 phone), trusted for the configured TTL."""

    __tablename__ = "capabilities"

    workspace_id: str = Field(primary_key=True, max_length=64)
    address: str = Field(primary_key=True, max_length=32)
    rcs_capable: bool
    checked_at: datetime = Field(sa_column=_ts())


class Segment(SegmentModel, table=True):
    __tablename__ = "segments"
    __table_args__ = (Index("ix_segments_workspace_id_id", "workspace_id", "id"),)

    id: str = Field(primary_key=True, max_length=32)
    workspace_id: str = Field(max_length=64)
    name: str = Field(max_length=255)
    # The serialized shoal.v1.Filter: the tree is re-validated and compiled on every use.
    filter_proto: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_ts())
