"""Experiment guardrails and traffic ramp: the guardrail specs, the ramp, its current step and
when each step began, why it stopped.

Revision ID: 0004_guardrails
Revises: 0003_spool
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_guardrails"
down_revision = "0003_spool"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN with server defaults: experiments already there get no guardrails and no ramp.
    op.add_column("experiments", sa.Column("guardrails", sa.JSON(), nullable=False, server_default="[]"))
    op.add_column("experiments", sa.Column("guard_settings", sa.JSON(), nullable=False, server_default="{}"))
    op.add_column("experiments", sa.Column("ramp", sa.JSON(), nullable=False, server_default="[]"))
    op.add_column("experiments", sa.Column("ramp_step", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("experiments", sa.Column("ramp_started", sa.JSON(), nullable=False, server_default="[]"))
    op.add_column("experiments", sa.Column("stop_reason", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    for column in ("stop_reason", "ramp_started", "ramp_step", "ramp", "guard_settings", "guardrails"):
        op.drop_column("experiments", column)
