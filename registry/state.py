"""Write bookkeeping shared by every write operation: the state counter and the actor of a write.

The single `registry_state` row is bumped by every write that can change what is served, so readers
(the gateway) notice changes with one indexed read; on PostgreSQL its row lock also serialises writers.
"""

from __future__ import annotations

import getpass
import socket
from typing import cast

from sqlalchemy import Engine, Table, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col

from .models import RegistryState, utcnow

_STATE = cast(Table, RegistryState.__table__)
# Built once: state_token runs on every gateway poll, and SQLAlchemy then reuses the cached compile.
Q_STATE = sa_select(_STATE.c.counter).where(_STATE.c.id == 1)


def default_actor() -> str:
    """`user@host` of the calling process (recorded on every write)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:128]


def bump_state(session: Session) -> None:
    """Advance the state counter; on PostgreSQL this row lock also serialises writers."""
    session.connection().execute(
        update(RegistryState)
        .where(col(RegistryState.id) == 1)
        .values(counter=RegistryState.counter + 1, updated_at=utcnow())
    )


def state_token(engine: Engine) -> str:
    """Changes whenever anything that affects serving changes (one indexed row read)."""
    with engine.connect() as connection:
        return str(connection.execute(Q_STATE).scalar_one())
