"""contact_events: drop ix_contact_events_type

Nothing reads contact_events by (workspace_id, type, occurred_at): QueryEvents asks per contact
(repo.query_events) and a segment's event condition is a COUNT correlated on contact_id
(filters.py), both served by ix_contact_events_contact. Every receipt the consumer records paid for
the unused index: about a third of its insert and commit cost on SQLite.

Revision ID: 5c0e7a2d9b41
Revises: 31f9b18d3ae2
Create Date: 2026-12-01 08:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "5c0e7a2d9b41"
down_revision: str | None = "31f9b18d3ae2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_contact_events_type", table_name="contact_events")


def downgrade() -> None:
    op.create_index(
        "ix_contact_events_type",
        "contact_events",
        ["workspace_id", "type", "occurred_at", "contact_id"],
        unique=False,
    )
