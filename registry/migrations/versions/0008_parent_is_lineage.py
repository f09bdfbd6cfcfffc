"""``expert_versions.parent_version`` means "trained from": a version derived from another one (its
``config.lineage``, `moea train --dpo --from`) keeps its parent; a version trained from the base model has
none. Until 0007 every version without a lineage got the previous version's number, which read as a
lineage it did not have; this clears those numbers (data only, no schema change).

Revision ID: 0008_parent_is_lineage
Revises: 0007_loop
Create Date: 2026-11-30
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0008_parent_is_lineage"
down_revision = "0007_loop"
branch_labels = None
depends_on = None

_VERSIONS = sa.table(
    "expert_versions",
    sa.column("id", sa.Integer),
    sa.column("config", sa.JSON),
    sa.column("parent_version", sa.Integer),
)


def _has_lineage(config: object) -> bool:
    if isinstance(config, str):  # a JSON column read back as text by some drivers
        try:
            config = json.loads(config)
        except ValueError:
            return False
    return isinstance(config, dict) and isinstance(config.get("lineage"), dict)


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(_VERSIONS.c.id, _VERSIONS.c.config).where(_VERSIONS.c.parent_version.is_not(None))
    ).all()
    plain = [row.id for row in rows if not _has_lineage(row.config)]
    for start in range(0, len(plain), 500):
        connection.execute(
            sa.update(_VERSIONS)
            .where(_VERSIONS.c.id.in_(plain[start : start + 500]))
            .values(parent_version=None)
        )


def downgrade() -> None:
    """Data only: the cleared predecessor numbers are not restored (they were not lineage)."""
