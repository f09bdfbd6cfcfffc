"""The dashboard's reads: each page asks the registry database a fixed number of questions, one statement
per table, whatever the number of experts, versions or logged requests (no N+1; tests/serving/test_ui.py
counts the statements).

The registry's own read functions answer one expert or one experiment at a time (the CLI's needs); the
dashboard shows all of them at once, so these reads fetch every row of a table in one statement and
build the registry's own views (:mod:`registry.views`, :func:`registry.versions.make_version_view`)
from the rows, so what a page shows is what `moea registry show` shows.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, func
from sqlalchemy import select as sa_select

from registry.models import (
    Alias,
    AliasEvent,
    Artifact,
    EvalScore,
    Expert,
    ExpertVersion,
    Outcome,
    RequestContent,
    RequestLog,
    as_utc,
)
from registry.versions import make_version_view
from registry.views import AliasEventView, ExpertVersionView, OutcomeRecord, RequestRecord

_EXPERTS = cast(Table, Expert.__table__)
_VERSIONS = cast(Table, ExpertVersion.__table__)
_ARTIFACTS = cast(Table, Artifact.__table__)
_ALIASES = cast(Table, Alias.__table__)
_HISTORY = cast(Table, AliasEvent.__table__)
_SCORES = cast(Table, EvalScore.__table__)
_REQUESTS = cast(Table, RequestLog.__table__)
_OUTCOMES = cast(Table, Outcome.__table__)
_CONTENT = cast(Table, RequestContent.__table__)

# The request columns are the RequestRecord fields stored in `requests` (one source of truth: a new column
# is read here too; fields kept in other tables, such as logged content, come after them and are left out).
_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(RequestRecord) if f.name in _REQUESTS.c)
_OUTCOME_FIELDS = ("request_id", "created_at", "reward", "thumbs", "key_name")

Q_VERSIONS = (
    sa_select(
        *_VERSIONS.c,
        _EXPERTS.c.name.label("expert_name"),
        _EXPERTS.c.task_kind.label("expert_task_kind"),
        _ARTIFACTS.c.size.label("artifact_size"),
    )
    .select_from(
        _VERSIONS.join(_EXPERTS, _EXPERTS.c.id == _VERSIONS.c.expert_id).join(
            _ARTIFACTS, _ARTIFACTS.c.id == _VERSIONS.c.artifact_id
        )
    )
    .order_by(_EXPERTS.c.name, _VERSIONS.c.version)
)
Q_ALIASES = sa_select(
    _ALIASES.c.version_id, _ALIASES.c.alias, _ALIASES.c.updated_at, _ALIASES.c.updated_by
).order_by(_ALIASES.c.alias)
Q_HISTORY = (
    sa_select(*_HISTORY.c, _EXPERTS.c.name.label("expert_name"))
    .select_from(_HISTORY.join(_EXPERTS, _EXPERTS.c.id == _HISTORY.c.expert_id))
    .order_by(_HISTORY.c.id)
)
Q_SCORES = sa_select(
    _SCORES.c.expert_version_id, _SCORES.c.golden_sha256, _SCORES.c.metric, _SCORES.c.score, _SCORES.c.n
).order_by(_SCORES.c.id)
Q_EXPERTS = sa_select(_EXPERTS.c.name, _EXPERTS.c.description, _EXPERTS.c.task_kind).order_by(_EXPERTS.c.name)


@dataclass(frozen=True)
class AliasNow:
    """Where an alias points now, and who moved it last."""

    alias: str
    version: int
    updated_at: datetime | None
    updated_by: str | None


@dataclass(frozen=True)
class EvalScoreRow:
    """A cached golden-set score of one version."""

    golden_sha256: str
    metric: str
    score: float
    n: int


@dataclass
class ExpertCatalog:
    """Every expert with its versions, aliases, alias history and cached eval scores."""

    experts: list[tuple[str, str, str]]
    """(name, description, task kind), by name."""
    versions: dict[str, list[ExpertVersionView]]
    aliases: dict[str, list[AliasNow]]
    history: dict[str, list[AliasEventView]]
    scores: dict[tuple[str, int], list[EvalScoreRow]]


def expert_catalog(engine: Engine) -> ExpertCatalog:
    """Every expert, version, alias, alias move and eval score: five statements in one read transaction."""
    with engine.connect() as connection:
        experts = [(r.name, r.description, r.task_kind) for r in connection.execute(Q_EXPERTS)]
        version_rows = connection.execute(Q_VERSIONS).all()
        alias_rows = connection.execute(Q_ALIASES).all()
        history_rows = connection.execute(Q_HISTORY).all()
        score_rows = connection.execute(Q_SCORES).all()
    by_id = {row.id: row for row in version_rows}
    aliases_of: dict[int, list[str]] = defaultdict(list)
    aliases: dict[str, list[AliasNow]] = defaultdict(list)
    for row in alias_rows:
        version = by_id.get(row.version_id)
        if version is None:
            continue
        aliases_of[row.version_id].append(row.alias)
        aliases[version.expert_name].append(
            AliasNow(row.alias, version.version, as_utc(row.updated_at), row.updated_by)
        )
    versions: dict[str, list[ExpertVersionView]] = defaultdict(list)
    for row in version_rows:
        view = make_version_view(row.expert_name, row.expert_task_kind, row, aliases_of.get(row.id, []))
        versions[row.expert_name].append(dataclasses.replace(view, size=int(row.artifact_size or 0)))
    history: dict[str, list[AliasEventView]] = defaultdict(list)
    for row in history_rows:
        history[row.expert_name].append(
            AliasEventView(
                row.expert_name,
                row.alias,
                row.action,
                row.from_version,
                row.to_version,
                row.actor,
                row.reason,
                as_utc(row.created_at),
            )  # fmt: skip
        )
    scores: dict[tuple[str, int], list[EvalScoreRow]] = defaultdict(list)
    for row in score_rows:
        version = by_id.get(row.expert_version_id)
        if version is not None:
            key = (version.expert_name, version.version)
            scores[key].append(EvalScoreRow(row.golden_sha256, row.metric, row.score, row.n))
    return ExpertCatalog(experts, dict(versions), dict(aliases), dict(history), dict(scores))


@dataclass(frozen=True)
class RouteCount:
    """Requests of the window that went one way."""

    expert: str | None
    version: int | None
    routed: bool
    requests: int


def route_counts(engine: Engine, since: datetime) -> list[RouteCount]:
    """Requests logged since `since` (shadow copies left out), grouped by expert, version and routed."""
    query = (
        sa_select(_REQUESTS.c.expert, _REQUESTS.c.version, _REQUESTS.c.routed, func.count())
        .where(_REQUESTS.c.created_at >= since, _REQUESTS.c.shadow.is_(False))
        .group_by(_REQUESTS.c.expert, _REQUESTS.c.version, _REQUESTS.c.routed)
    )
    with engine.connect() as connection:
        return [RouteCount(e, v, bool(r), int(n)) for e, v, r, n in connection.execute(query)]


def recent_requests(engine: Engine, limit: int) -> list[RequestRecord]:
    """The newest `limit` logged requests, newest first, with their content where `moea serve
    --log-content` stored it (`messages`/`answer` stay None otherwise); one statement."""
    query = (
        sa_select(*(_REQUESTS.c[name] for name in _REQUEST_FIELDS), _CONTENT.c.messages, _CONTENT.c.answer)
        .select_from(
            _REQUESTS.outerjoin(
                _CONTENT,
                (_CONTENT.c.request_id == _REQUESTS.c.request_id) & (_CONTENT.c.shadow == _REQUESTS.c.shadow),
            )
        )
        .order_by(_REQUESTS.c.id.desc())
    )
    with engine.connect() as connection:
        rows = connection.execute(query.limit(limit)).all()
    return [dataclasses.replace(_request_record(row[:-2]), messages=row[-2], answer=row[-1]) for row in rows]


def _request_record(row: Any) -> RequestRecord:
    # Positional (the columns are the dataclass fields in order): a page may build 10,000s of these.
    request_id, created_at, *rest = row
    return RequestRecord(request_id, as_utc(created_at), *rest)


def experiments_data(
    engine: Engine, experiment_ids: Sequence[int]
) -> tuple[dict[int, list[RequestRecord]], dict[int, list[OutcomeRecord]]]:
    """Logged requests and outcomes of each experiment, in insertion order: two statements for all of them
    (the same rows :meth:`registry.service.Registry.experiment_requests` / ``experiment_outcomes`` give)."""
    requests: dict[int, list[RequestRecord]] = {i: [] for i in experiment_ids}
    outcomes: dict[int, list[OutcomeRecord]] = {i: [] for i in experiment_ids}
    if not experiment_ids:
        return requests, outcomes
    ids = list(experiment_ids)
    request_query = (
        sa_select(*(_REQUESTS.c[name] for name in _REQUEST_FIELDS))
        .where(_REQUESTS.c.experiment_id.in_(ids))
        .order_by(_REQUESTS.c.id)
    )
    owners = (
        sa_select(_REQUESTS.c.request_id, _REQUESTS.c.experiment_id)
        .where(_REQUESTS.c.experiment_id.in_(ids))
        .distinct()
        .subquery()
    )
    outcome_query = (
        sa_select(*(_OUTCOMES.c[name] for name in _OUTCOME_FIELDS), owners.c.experiment_id)
        .select_from(_OUTCOMES.join(owners, owners.c.request_id == _OUTCOMES.c.request_id))
        .order_by(_OUTCOMES.c.id)
    )
    with engine.connect() as connection:
        request_rows = connection.execute(request_query).all()
        outcome_rows = connection.execute(outcome_query).all()
    for row in request_rows:
        record = _request_record(row)
        requests[int(record.experiment_id)].append(record)  # type: ignore[arg-type]
    for request_id, created_at, reward, thumbs, key_name, experiment_id in outcome_rows:
        outcomes[int(experiment_id)].append(
            OutcomeRecord(request_id, as_utc(created_at), reward, thumbs, key_name)  # type: ignore[arg-type]
        )
    return requests, outcomes
