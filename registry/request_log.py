"""The request log and outcomes the gateway writes in batches, and their reads per A/B experiment."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, func, insert, text
from sqlalchemy import select as sa_select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from . import db
from .models import Outcome, RequestContent, RequestLog, as_utc
from .views import CONTENT_FIELDS, OutcomeRecord, RatingState, RequestRecord, rating_accepted

# An A/B report reads tens of thousands of rows, so the reads bypass the ORM (no identity map, no per-row
# objects) and use statements built once here, which SQLAlchemy's compiled cache then reuses.
_REQUESTS = cast(Table, RequestLog.__table__)
_OUTCOMES = cast(Table, Outcome.__table__)
_CONTENT = cast(Table, RequestContent.__table__)
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
    "key_name",
)
_OUTCOME_COLUMNS = ("request_id", "created_at", "reward", "thumbs", "key_name")
Q_EXPERIMENT_REQUESTS = (
    sa_select(*(_REQUESTS.c[name] for name in _REQUEST_FIELDS))
    .where(_REQUESTS.c.experiment_id == bindparam("experiment_id"))
    .order_by(_REQUESTS.c.id)
)
Q_EXPERIMENT_OUTCOMES = (
    sa_select(*(_OUTCOMES.c[name] for name in _OUTCOME_COLUMNS))
    .where(
        _OUTCOMES.c.request_id.in_(
            sa_select(_REQUESTS.c.request_id).where(_REQUESTS.c.experiment_id == bindparam("experiment_id"))
        )
    )
    .order_by(_OUTCOMES.c.id)
)
Q_REQUEST_OWNER = (
    sa_select(_REQUESTS.c.key_name)
    .where(_REQUESTS.c.request_id == bindparam("request_id"), _REQUESTS.c.shadow.is_(False))
    .order_by(_REQUESTS.c.id)
    .limit(1)
)
Q_LATEST_RATER = (
    sa_select(_OUTCOMES.c.key_name)
    .where(_OUTCOMES.c.request_id == bindparam("request_id"))
    .order_by(_OUTCOMES.c.id.desc())
    .limit(1)
)
_PG_OUTCOMES_LOCK = 0x6D6F6F63  # transaction-scoped advisory lock serialising outcome writers (PostgreSQL)


def _insert_new_statement(dialect: str, table: Table, key: list[str]) -> Any:
    """An insert into `table` that skips rows whose unique `key` is already stored.

    SQLite and PostgreSQL: ``INSERT ... ON CONFLICT (key) DO NOTHING``. Other databases get a plain
    insert (a repeated key then fails the transaction with an IntegrityError)."""
    if dialect in ("sqlite", "postgresql"):
        module = sqlite if dialect == "sqlite" else postgresql
        return module.insert(table).on_conflict_do_nothing(index_elements=key)
    return insert(table)


def log_requests(engine: Engine, records: list[RequestRecord]) -> None:
    """Insert a batch of request records in one transaction (does not change the state token); the
    content of records that carry some (`messages` set: `moea serve --log-content`) goes to the
    ``request_content`` table in the same transaction.

    Idempotent: a record whose (request_id, shadow) is already logged is skipped, its content too."""
    if not records:
        return
    rows = [asdict(r) for r in records]
    requests = [{k: v for k, v in row.items() if k not in CONTENT_FIELDS} for row in rows]
    content = [
        {"request_id": row["request_id"], "shadow": row["shadow"], "created_at": row["created_at"],
         "messages": row["messages"], "answer": row["answer"]}
        for row in rows
        if row["messages"] is not None
    ]  # fmt: skip
    key = ["request_id", "shadow"]

    def write(session: Session) -> None:
        connection = session.connection()
        connection.execute(_insert_new_statement(connection.dialect.name, _REQUESTS, key), requests)
        if content:
            connection.execute(_insert_new_statement(connection.dialect.name, _CONTENT, key), content)

    db.run_transaction(engine, write)


def record_outcomes(engine: Engine, records: list[OutcomeRecord]) -> list[OutcomeRecord]:
    """Insert a batch of outcomes in one transaction, keeping the first rating of each response: an
    outcome is refused when the response already has a rating from another key, unless it may
    override (:func:`registry.models.rating_accepted`). Returns the refused outcomes (not written).
    Idempotent: an outcome whose outcome_id is already stored is skipped (a spool drained twice).

    This is the last word when several gateways take feedback on one response at once (writers are
    serialised: SQLite's BEGIN IMMEDIATE, an advisory lock on PostgreSQL)."""
    if not records:
        return []

    def write(session: Session) -> list[OutcomeRecord]:
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_OUTCOMES_LOCK})
        current = _standing_raters(connection, {r.request_id for r in records})
        rows, refused = [], []
        for record in records:
            if not rating_accepted(current.get(record.request_id), record.key_name, record.override):
                refused.append(record)
                continue
            current[record.request_id] = (record.key_name,)
            rows.append({name: getattr(record, name) for name in (*_OUTCOME_COLUMNS, "outcome_id")})
        if rows:
            connection.execute(
                _insert_new_statement(connection.dialect.name, _OUTCOMES, ["outcome_id"]), rows
            )
        return refused

    return db.run_transaction(engine, write)


def _standing_raters(connection: Connection, request_ids: set[str]) -> dict[str, tuple[str | None]]:
    """request_id → (key name of its latest outcome,) for the given ids that have an outcome."""
    latest = (
        sa_select(func.max(_OUTCOMES.c.id))
        .where(_OUTCOMES.c.request_id.in_(request_ids))
        .group_by(_OUTCOMES.c.request_id)
    )
    rows = connection.execute(
        sa_select(_OUTCOMES.c.request_id, _OUTCOMES.c.key_name).where(_OUTCOMES.c.id.in_(latest))
    )
    return {request_id: (key_name,) for request_id, key_name in rows}


def rating_state(engine: Engine, request_id: str) -> RatingState | None:
    """Who made the (non-shadow) request `request_id` and whose rating stands; None when not logged."""
    with engine.connect() as connection:
        owner = connection.execute(Q_REQUEST_OWNER, {"request_id": request_id}).first()
        if owner is None:
            return None
        rater = connection.execute(Q_LATEST_RATER, {"request_id": request_id}).first()
    return RatingState(request_id, owner[0], rater is not None, rater[0] if rater is not None else None)


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
        OutcomeRecord(request_id, as_utc(created_at), reward, thumbs, key_name)
        for request_id, created_at, reward, thumbs, key_name in rows
    ]
