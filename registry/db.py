"""Database plumbing: URL resolution, engines, transactions with retries, and migrations.

SQLite (the default) runs in WAL mode with foreign keys on and a busy timeout. Write transactions
start with `BEGIN IMMEDIATE`, so concurrent writers queue on the database lock instead of failing
when a read snapshot tries to upgrade to a write; any SQLITE_BUSY that still escapes is retried here,
never shown to users. On PostgreSQL every serving-affecting write first locks the single
`registry_state` row, which serialises writers the same way; unique-key races and serialization
failures are retried.

Migrations: `open_engine` brings the schema to alembic head automatically. The upgrade runs inside one
write transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock), so
processes opening a fresh or old database at the same time upgrade it exactly once.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlmodel import Session

from .errors import RegistryError, ValidationError
from .local import moea_home

T = TypeVar("T")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x6D6F6561  # "moea"
BUSY_TIMEOUT_MS = 30_000


def default_url() -> str:
    """`$MOEA_REGISTRY_URL` or `sqlite:///$MOEA_HOME/registry.db`."""
    return os.environ.get("MOEA_REGISTRY_URL") or f"sqlite:///{moea_home() / 'registry.db'}"


def default_store_dir() -> Path:
    """`$MOEA_STORE_DIR` or `$MOEA_HOME/store`."""
    return Path(os.environ.get("MOEA_STORE_DIR") or moea_home() / "store").expanduser()


@dataclass
class RetryStats:
    """Counters of internal retries (reported by benchmarks; never surfaced as errors)."""

    busy: int = 0
    conflicts: int = 0


STATS = RetryStats()


def is_sqlite(engine: Engine | Connection) -> bool:
    """True when the engine talks to SQLite."""
    return engine.dialect.name == "sqlite"


def open_engine(url: str | None = None, *, upgrade: bool = True) -> Engine:
    """Create an engine for `url` (default: `default_url()`); bring the schema to head unless told not to."""
    url = url or default_url()
    try:
        parsed = make_url(url)
    except Exception as error:  # noqa: BLE001 - sqlalchemy raises several types here
        raise ValidationError(
            f"invalid registry URL {url!r}: {error}; example: sqlite:////abs/path/registry.db"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed)
    else:
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        engine = create_engine(parsed, pool_pre_ping=True)
    if upgrade:
        ensure_schema(engine)
    return engine


def _sqlite_engine(parsed) -> Engine:  # type: ignore[no-untyped-def]
    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        parsed, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy (not pysqlite) decide when transactions begin, so we can say IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get("moea_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _is_busy(error: BaseException) -> bool:
    message = str(getattr(error, "orig", error)).lower()
    return "database is locked" in message or "database is busy" in message or "sqlite_busy" in message


def _is_retryable_conflict(error: DBAPIError) -> bool:
    if isinstance(error, SAIntegrityError):
        return True
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return sqlstate in {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available


def run_transaction(
    engine: Engine,
    work: Callable[[Session], T],
    *,
    write: bool = True,
    retry_conflicts: bool = False,
    deadline_s: float = 120.0,
) -> T:
    """Run `work(session)` in one transaction and commit; retry busy/conflict errors with jittered backoff.

    `work` must be safe to run again from scratch (everything it reads is re-read on retry).
    `retry_conflicts` also retries unique-key violations: use it where such a violation can only mean
    another writer won a race (version numbers, first creation of an expert).
    """
    started, attempt = time.monotonic(), 0
    bind = engine.execution_options(moea_write=True) if write else engine
    while True:
        attempt += 1
        try:
            with Session(bind, expire_on_commit=False) as session:
                result = work(session)
                session.commit()
                return result
        except OperationalError as error:
            if not _is_busy(error) and not _is_retryable_conflict(error):
                raise
            STATS.busy += 1
        except DBAPIError as error:
            integrity = isinstance(error, SAIntegrityError)
            if not _is_retryable_conflict(error) or (integrity and not retry_conflicts):
                raise
            STATS.conflicts += 1
        if time.monotonic() - started > deadline_s:
            raise RegistryError(
                f"the registry stayed busy for {deadline_s:.0f} s after {attempt} attempts; "
                "another process holds a long write lock, retry later"
            )
        time.sleep(min(0.5, 0.005 * 2 ** min(attempt, 7)) * random.uniform(0.5, 1.5))


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A short read transaction (deferred BEGIN on SQLite)."""
    with engine.connect() as connection:
        yield connection


# ------------------------------------------------------------------------------------------ migrations


@functools.cache
def _alembic_config():  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@functools.cache
def head_revisions() -> tuple[str, ...]:
    """The head revision(s) of the migration scripts (CI asserts there is exactly one)."""
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(_alembic_config()).get_heads())


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_schema(engine: Engine) -> None:
    """Upgrade to head if needed: a cheap read when already there, one locked upgrade otherwise."""
    heads = head_revisions()
    if len(heads) != 1:
        raise RegistryError(
            f"migration scripts have {len(heads)} heads {heads}; merge them with `alembic merge`"
        )
    if current_revision(engine) == heads[0]:
        return
    upgrade(engine, "head")


def upgrade(engine: Engine, target: str = "head") -> None:
    """Run alembic `upgrade target` inside one locked write transaction (safe to race)."""
    from alembic import command

    def attempt() -> None:
        with engine.execution_options(moea_write=True).connect() as connection, connection.begin():
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            config = _alembic_config()
            config.attributes["connection"] = connection
            try:
                command.upgrade(config, target)
            finally:
                config.attributes.pop("connection", None)

    for tries in range(20):
        try:
            attempt()
            return
        except OperationalError as error:
            if not _is_busy(error) or tries == 19:
                raise
            STATS.busy += 1
            time.sleep(0.05 * random.uniform(0.5, 1.5))
