"""The request log and outcomes the gateway writes in batches, and their reads per A/B experiment."""

from __future__ import annotations

from dataclasses import asdict
from typing import cast

from sqlalchemy import Engine, Table, bindparam, insert
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite

from . import db
from .models import Outcome, OutcomeRecord, RequestLog, RequestRecord, as_utc

# An A/B report reads tens of thousands of rows, so the reads bypass the ORM (no identity map, no per-row
# objects) and use statements built once here, which SQLAlchemy's compiled cache then reuses.
_REQUESTS = cast(Table, RequestLog.__table__)
_OUTCOMES = cast(Table, Outcome.__table__)
_REQUEST_FIELDS = (
    "request_id",
    "created_at",
    "expert",
    "version",
    "experiment_id",
    "user",
    "routed",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "status_code",
    "shadow",
)
Q_EXPERIMENT_REQUESTS = (
    sa_select(*(_REQUESTS.c[name] for name in _REQUEST_FIELDS))
    .where(_REQUESTS.c.experiment_id == bindparam("experiment_id"))
    .order_by(_REQUESTS.c.id)
)
Q_EXPERIMENT_OUTCOMES = (
    sa_select(_OUTCOMES.c.request_id, _OUTCOMES.c.created_at, _OUTCOMES.c.reward, _OUTCOMES.c.thumbs)
    .where(
        _OUTCOMES.c.request_id.in_(
            sa_select(_REQUESTS.c.request_id).where(_REQUESTS.c.experiment_id == bindparam("experiment_id"))
        )
    )
    .order_by(_OUTCOMES.c.id)
)


def _insert_new(engine: Engine, table: Table, key: list[str], rows: list[dict]) -> None:
    """Insert `rows` in one transaction, skipping rows whose unique `key` is already stored.

    SQLite and PostgreSQL: ``INSERT ... ON CONFLICT (key) DO NOTHING``. Other databases get a plain
    insert (a repeated key then fails the transaction with an IntegrityError)."""
    dialect = engine.dialect.name
    if dialect in ("sqlite", "postgresql"):
        module = sqlite if dialect == "sqlite" else postgresql
        statement = module.insert(table).on_conflict_do_nothing(index_elements=key)
    else:
        statement = insert(table)
    db.run_transaction(engine, lambda s: s.connection().execute(statement, rows))


def log_requests(engine: Engine, records: list[RequestRecord]) -> None:
    """Insert a batch of request records in one transaction (does not change the state token).

    Idempotent: a record whose (request_id, shadow) is already logged is skipped."""
    if records:
        _insert_new(engine, _REQUESTS, ["request_id", "shadow"], [asdict(r) for r in records])


def record_outcomes(engine: Engine, records: list[OutcomeRecord]) -> None:
    """Insert a batch of outcomes in one transaction; one whose outcome_id is already stored is skipped."""
    if records:
        _insert_new(engine, _OUTCOMES, ["outcome_id"], [asdict(r) for r in records])


def experiment_requests(engine: Engine, experiment_id: int) -> list[RequestRecord]:
    """Every request logged under the experiment, in insertion order."""
    with engine.connect() as connection:
        rows = connection.execute(Q_EXPERIMENT_REQUESTS, {"experiment_id": experiment_id}).all()
    return [RequestRecord(request_id, as_utc(created_at), *rest) for request_id, created_at, *rest in rows]


def experiment_outcomes(engine: Engine, experiment_id: int) -> list[OutcomeRecord]:
    """Outcomes whose request was logged under the experiment, in insertion order."""
    with engine.connect() as connection:
        rows = connection.execute(Q_EXPERIMENT_OUTCOMES, {"experiment_id": experiment_id}).all()
    return [
        OutcomeRecord(request_id, as_utc(created_at), reward, thumbs)
        for request_id, created_at, reward, thumbs in rows
    ]
