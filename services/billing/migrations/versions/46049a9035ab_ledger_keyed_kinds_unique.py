"""ledger: unique keys only for the kinds the ledger itself keeps once

A hold's entries (HOLD, CAPTURE, RELEASE) exist once through the holds row (its primary key, a
status that leaves HELD once, under the account lock); indexing their random keys a second time
was half of the database's work per send. Keyed top-ups, auto-reloads and adjustments keep the
unique index, now partial (see models.LEDGER_KEYED_KINDS).

Revision ID: 46049a9035ab
Revises: 703bbce7ed96
Create Date: 2026-12-01 07:51:31.964698
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "46049a9035ab"
down_revision: str | None = "703bbce7ed96"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# TOP_UP, AUTO_RELOAD, ADJUSTMENT; spelled out, as a migration must not follow later code.
KEYED = sa.text("kind IN (1, 5, 6)")


def upgrade() -> None:
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.drop_constraint("uq_ledger_kind_key", type_="unique")
        batch_op.create_index(
            "uq_ledger_keyed_kind_key",
            ["workspace_id", "kind", "key"],
            unique=True,
            sqlite_where=KEYED,
            postgresql_where=KEYED,
        )


def downgrade() -> None:
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.drop_index("uq_ledger_keyed_kind_key")
        batch_op.create_unique_constraint("uq_ledger_kind_key", ["workspace_id", "kind", "key"])
