"""API key names on the request log and outcomes (who made a request, who rated it; never the key).

Revision ID: 0005_keys
Revises: 0004_guardrails
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_keys"
down_revision = "0004_guardrails"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows logged before keys had names (or by a gateway without --api-key) have none.
    op.add_column("requests", sa.Column("key_name", sa.String(64), nullable=True))
    op.add_column("outcomes", sa.Column("key_name", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("outcomes", "key_name")  # native DROP COLUMN (SQLite >= 3.35)
    op.drop_column("requests", "key_name")
