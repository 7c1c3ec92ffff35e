"""pending executions indexed by run and contact instead of id; no index on sends.execution_id

The nudge queries page a campaign's pending executions by (run, contact, entry) now; that key
follows the order in which fan-outs insert and workers claim, while the hashed ids scattered
every row of a batch over its own index page. For the same reason sends lose their
execution_id index: GetExecution finds an execution's sends by their keys instead.

Revision ID: 7c3e9a41d2b8
Revises: 2fd17b0175d5
Create Date: 2026-12-01 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7c3e9a41d2b8"
down_revision: str | None = "2fd17b0175d5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PENDING = sa.text("state = 1")


def upgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_executions_pending_run_contact",
            ["campaign_id", "run_id", "contact_id", "entry"],
            unique=False,
            sqlite_where=_PENDING,
            postgresql_where=_PENDING,
        )
        batch_op.drop_index(
            "ix_executions_pending_campaign", sqlite_where=_PENDING, postgresql_where=_PENDING
        )
    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.drop_index("ix_sends_execution")


def downgrade() -> None:
    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.create_index("ix_sends_execution", ["execution_id"], unique=False)
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_executions_pending_campaign",
            ["campaign_id", "id"],
            unique=False,
            sqlite_where=_PENDING,
            postgresql_where=_PENDING,
        )
        batch_op.drop_index(
            "ix_executions_pending_run_contact", sqlite_where=_PENDING, postgresql_where=_PENDING
        )
