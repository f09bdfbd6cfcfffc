"""Aliases with append-only history, archiving, experiments, request log, outcomes, state counter.

Revision ID: 0002_aliases_experiments
Revises: 0001_foundation
Create Date: 2026-05-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_aliases_experiments"
down_revision = "0001_foundation"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:  # long: one op per table/column change, the frozen record of this revision
    # Existing versions stay live: archived defaults to false for every row already there. Plain ADD
    # COLUMN (not batch mode): SQLite's table rebuild would trip the foreign keys pointing at these tables.
    op.add_column(
        "expert_versions", sa.Column("archived", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column("expert_versions", _ts("archived_at", nullable=True))
    op.add_column(
        "router_versions", sa.Column("archived", sa.Boolean(), nullable=False, server_default=sa.false())
    )

    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("expert_id", sa.Integer(), sa.ForeignKey("experts.id"), nullable=False),
        sa.Column("alias", sa.String(32), nullable=False),
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("expert_versions.id"), nullable=False),
        _ts("updated_at"),
        sa.Column("updated_by", sa.String(128), nullable=True),
        sa.UniqueConstraint("expert_id", "alias", name="uq_aliases_expert_alias"),
    )
    op.create_table(
        "alias_history",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("expert_id", sa.Integer(), sa.ForeignKey("experts.id"), nullable=False),
        sa.Column("alias", sa.String(32), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        _ts("created_at"),
    )
    op.create_index("ix_alias_history_expert_id", "alias_history", ["expert_id"])
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("expert_id", sa.Integer(), sa.ForeignKey("experts.id"), nullable=False),
        sa.Column("arms", sa.JSON(), nullable=False),
        sa.Column("metric", sa.String(16), nullable=False),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("shadow_version", sa.Integer(), nullable=True),
        sa.Column("winner", sa.Integer(), nullable=True),
        _ts("started_at"),
        _ts("stopped_at", nullable=True),
        sa.Column("created_by", sa.String(128), nullable=True),
    )
    running = sa.text("status = 'running'")
    op.create_index(
        "uq_experiments_one_running",
        "experiments",
        ["expert_id"],
        unique=True,
        sqlite_where=running,
        postgresql_where=running,
    )
    op.create_table(
        "requests",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        _ts("created_at"),
        sa.Column("expert", sa.String(64), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("experiment_id", sa.Integer(), nullable=True),
        sa.Column("user", sa.String(256), nullable=True),
        sa.Column("routed", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("shadow", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_requests_request_id", "requests", ["request_id"])
    op.create_index("ix_requests_experiment_id", "requests", ["experiment_id"])
    op.create_table(
        "outcomes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        _ts("created_at"),
        sa.Column("reward", sa.Float(), nullable=True),
        sa.Column("thumbs", sa.Boolean(), nullable=True),
    )
    op.create_index("ix_outcomes_request_id", "outcomes", ["request_id"])
    op.create_table(
        "registry_state",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        _ts("updated_at"),
    )
    op.execute("INSERT INTO registry_state (id, counter, updated_at) VALUES (1, 1, CURRENT_TIMESTAMP)")


def downgrade() -> None:
    op.drop_table("registry_state")
    op.drop_index("ix_outcomes_request_id", table_name="outcomes")
    op.drop_table("outcomes")
    op.drop_index("ix_requests_experiment_id", table_name="requests")
    op.drop_index("ix_requests_request_id", table_name="requests")
    op.drop_table("requests")
    op.drop_index("uq_experiments_one_running", table_name="experiments")
    op.drop_table("experiments")
    op.drop_index("ix_alias_history_expert_id", table_name="alias_history")
    op.drop_table("alias_history")
    op.drop_table("aliases")
    op.drop_column("router_versions", "archived")  # native DROP COLUMN (SQLite >= 3.35)
    op.drop_column("expert_versions", "archived_at")
    op.drop_column("expert_versions", "archived")
