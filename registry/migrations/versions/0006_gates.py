"""Eval gates: golden sets attached to experts (versioned, content-hashed) and eval scores cached per
(expert version, golden set hash), with the greedy answers the gateway checks on load.

Revision ID: 0006_gates
Revises: 0005_keys
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_gates"
down_revision = "0005_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "golden_sets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("expert_id", sa.Integer(), sa.ForeignKey("experts.id"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("artifact_id", sa.Integer(), sa.ForeignKey("artifacts.id"), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.UniqueConstraint("expert_id", "version", name="uq_golden_sets_expert_version"),
    )
    op.create_table(
        "eval_scores",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("expert_version_id", sa.Integer(), sa.ForeignKey("expert_versions.id"), nullable=False),
        sa.Column("golden_sha256", sa.String(64), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("probes", sa.JSON(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.UniqueConstraint("expert_version_id", "golden_sha256", name="uq_eval_scores_version_golden"),
    )


def downgrade() -> None:
    op.drop_table("eval_scores")
    op.drop_table("golden_sets")
