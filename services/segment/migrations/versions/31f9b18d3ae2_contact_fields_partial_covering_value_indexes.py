"""contact_fields: partial covering value indexes

One index per value kind, over the rows that hold a value of that kind and ending with contact_id:
each field row is written to one index instead of four, and a segment count can start from the
index alone (services/segment/repo.py count_audience).

Revision ID: 31f9b18d3ae2
Revises: a490392793c6
Create Date: 2026-12-01 05:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "31f9b18d3ae2"
down_revision: str | None = "a490392793c6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = ("str", "num", "ts", "bool")


def upgrade() -> None:
    for kind in KINDS:
        op.drop_index(f"ix_contact_fields_{kind}", table_name="contact_fields")
        where = sa.text(f"{kind}_value IS NOT NULL")
        op.create_index(
            f"ix_contact_fields_{kind}_value",
            "contact_fields",
            ["workspace_id", "name", f"{kind}_value", "contact_id"],
            unique=False,
            sqlite_where=where,
            postgresql_where=where,
        )


def downgrade() -> None:
    for kind in KINDS:
        op.drop_index(f"ix_contact_fields_{kind}_value", table_name="contact_fields")
        op.create_index(
            f"ix_contact_fields_{kind}",
            "contact_fields",
            ["workspace_id", "name", f"{kind}_value"],
            unique=False,
        )
