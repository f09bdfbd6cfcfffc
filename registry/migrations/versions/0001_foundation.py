"""Foundation schema: experts, immutable versions, content-addressed artifacts, routers.

Revision ID: 0001_foundation
Revises:
Create Date: 2026-05-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_foundation"
down_revision = None
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:  # long: one op per table/column change, the frozen record of this revision
    op.create_table(
        "experts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("task_kind", sa.String(32), nullable=False),
        sa.Column("base_model", sa.String(1024), nullable=False),
        sa.Column("base_model_sha256", sa.String(64), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
    )
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("file_count", sa.Integer(), nullable=False),
        _ts("created_at"),
    )
    op.create_table(
        "artifact_files",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("artifact_id", sa.Integer(), sa.ForeignKey("artifacts.id"), nullable=False),
        sa.Column("relpath", sa.String(512), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("artifact_id", "relpath", name="uq_artifact_files_artifact_relpath"),
    )
    op.create_index("ix_artifact_files_sha256", "artifact_files", ["sha256"])
    op.create_table(
        "expert_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("expert_id", sa.Integer(), sa.ForeignKey("experts.id"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("artifact_id", sa.Integer(), sa.ForeignKey("artifacts.id"), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("base_model", sa.String(1024), nullable=False),
        sa.Column("base_model_name", sa.String(256), nullable=True),
        sa.Column("base_model_sha256", sa.String(64), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("run_dir", sa.String(4096), nullable=True),
        sa.Column("mixture_sha256", sa.String(64), nullable=True),
        sa.Column("git_commit", sa.String(64), nullable=True),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        _ts("created_at"),
        sa.Column("created_by", sa.String(128), nullable=True),
        sa.UniqueConstraint("expert_id", "version", name="uq_expert_versions_expert_version"),
    )
    op.create_table(
        "router_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False, unique=True),
        sa.Column("artifact_id", sa.Integer(), sa.ForeignKey("artifacts.id"), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("encoder", sa.String(1024), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("run_dir", sa.String(4096), nullable=True),
        sa.Column("mixture_sha256", sa.String(64), nullable=True),
        sa.Column("git_commit", sa.String(64), nullable=True),
        _ts("created_at"),
        sa.Column("created_by", sa.String(128), nullable=True),
    )
    op.create_table(
        "router_experts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("router_version_id", sa.Integer(), sa.ForeignKey("router_versions.id"), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("expert_version_id", sa.Integer(), sa.ForeignKey("expert_versions.id"), nullable=False),
        sa.UniqueConstraint("router_version_id", "label", name="uq_router_experts_router_label"),
    )


def downgrade() -> None:
    op.drop_table("router_experts")
    op.drop_table("router_versions")
    op.drop_table("expert_versions")
    op.drop_index("ix_artifact_files_sha256", table_name="artifact_files")
    op.drop_table("artifact_files")
    op.drop_table("artifacts")
    op.drop_table("experts")
