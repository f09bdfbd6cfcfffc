"""Idempotent request log: unique (request_id, shadow) on requests, outcomes.outcome_id (unique).

The gateway's request log spools to a local file and drains it into the database; after a crash it
inserts again what it may already have written. These keys let those inserts be no-ops
(`INSERT ... ON CONFLICT DO NOTHING`), so every request is logged exactly once.

Rows that already repeat a (request_id, shadow) pair (only the old writer's retry of a batch whose
commit had in fact succeeded could make one) are deleted first, keeping the first row.

Revision ID: 0003_spool
Revises: 0002_aliases_experiments
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_spool"
down_revision = "0002_aliases_experiments"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "DELETE FROM requests WHERE id NOT IN "
        "(SELECT keep FROM (SELECT MIN(id) AS keep FROM requests GROUP BY request_id, shadow) AS firsts)"
    )
    op.create_index("uq_requests_request_id_shadow", "requests", ["request_id", "shadow"], unique=True)
    op.add_column("outcomes", sa.Column("outcome_id", sa.String(64), nullable=True))
    op.create_index("uq_outcomes_outcome_id", "outcomes", ["outcome_id"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_outcomes_outcome_id", table_name="outcomes")
    op.drop_column("outcomes", "outcome_id")  # native DROP COLUMN (SQLite >= 3.35)
    op.drop_index("uq_requests_request_id_shadow", table_name="requests")
