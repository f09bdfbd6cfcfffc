"""Request content (`moea serve --log-content`): the client's messages and the answer text of a logged
request, keyed like its request row, (request_id, shadow).

Revision ID: 0007_loop
Revises: 0006_gates
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_loop"
down_revision = "0006_gates"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_content",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("shadow", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=True),
        sa.Column("answer", sa.Text(), nullable=True),
    )
    op.create_index(
        "uq_request_content_request_id_shadow", "request_content", ["request_id", "shadow"], unique=True
    )
    op.create_index("ix_request_content_created_at", "request_content", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_request_content_created_at", table_name="request_content")
    op.drop_index("uq_request_content_request_id_shadow", table_name="request_content")
    op.drop_table("request_content")
