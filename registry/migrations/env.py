"""Alembic environment for the registry.

The registry calls alembic programmatically (`registry.db.upgrade`) and hands over an open connection
in `config.attributes["connection"]`, already inside the locked transaction. Run standalone with
`alembic -x url=sqlite:///path/registry.db upgrade head` it opens its own connection instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlmodel import SQLModel

import registry.models  # noqa: F401 - registers the tables on SQLModel.metadata

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    """Migrate through the connection the registry passed in, or one opened from `-x url=`."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as own_connection:
        _run(own_connection)
        own_connection.commit()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database URL")
run_migrations_online()
