"""Reads and purges of request content (`moea serve --log-content`): the ``request_content`` rows that
:func:`registry.request_log.log_requests` writes with their request rows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Engine, Table, and_, delete, func
from sqlalchemy import select as sa_select
from sqlalchemy.orm import Session

from . import db
from .models import Outcome, RequestContent, RequestLog, as_utc
from .views import LoggedAnswer

_REQUESTS = cast(Table, RequestLog.__table__)
_OUTCOMES = cast(Table, Outcome.__table__)
_CONTENT = cast(Table, RequestContent.__table__)


def purge_content(engine: Engine, before: datetime) -> int:
    """Delete the content of requests logged before `before` (naive = UTC), in one transaction; the
    request rows and their outcomes stay. Returns how many content rows were deleted."""
    cutoff = before.astimezone(UTC) if before.tzinfo is not None else before.replace(tzinfo=UTC)
    statement = delete(_CONTENT).where(_CONTENT.c.created_at < cutoff)

    def work(session: Session) -> int:
        return session.connection().execute(statement).rowcount or 0

    return db.run_transaction(engine, work)


def count_content(engine: Engine) -> int:
    """How many requests have content stored."""
    with engine.connect() as connection:
        return connection.execute(sa_select(func.count()).select_from(_CONTENT)).scalar_one()


def logged_answers(engine: Engine, expert: str, experiment_id: int | None = None) -> list[LoggedAnswer]:
    """Every answered (status 200, not shadow) request of `expert` (of one experiment's arms when
    `experiment_id` is given) that has a rating, with the rating that stands (its latest outcome) and its
    content when stored; in insertion order."""
    latest = (
        sa_select(_OUTCOMES.c.request_id, func.max(_OUTCOMES.c.id).label("outcome_id"))
        .group_by(_OUTCOMES.c.request_id)
        .subquery()
    )
    conditions = [_REQUESTS.c.expert == expert, _REQUESTS.c.shadow.is_(False), _REQUESTS.c.status_code == 200]
    if experiment_id is not None:
        conditions.append(_REQUESTS.c.experiment_id == experiment_id)
    query = (
        sa_select(
            _REQUESTS.c.request_id,
            _REQUESTS.c.created_at,
            _REQUESTS.c.expert,
            _REQUESTS.c.version,
            _REQUESTS.c.experiment_id,
            _REQUESTS.c.user,
            _OUTCOMES.c.reward,
            _OUTCOMES.c.thumbs,
            _CONTENT.c.messages,
            _CONTENT.c.answer,
        )  # fmt: skip
        .join(latest, latest.c.request_id == _REQUESTS.c.request_id)
        .join(_OUTCOMES, _OUTCOMES.c.id == latest.c.outcome_id)
        .outerjoin(
            _CONTENT,
            and_(_CONTENT.c.request_id == _REQUESTS.c.request_id, _CONTENT.c.shadow == _REQUESTS.c.shadow),
        )
        .where(*conditions)
        .order_by(_REQUESTS.c.id)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        LoggedAnswer(request_id, cast(datetime, as_utc(created_at)), *rest)
        for request_id, created_at, *rest in rows
    ]
