"""Aliases: movable names (`prod`, `canary`, …) pointing at versions; every move is kept in a history."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session, select

from . import db
from .errors import ConflictError
from .models import Alias, AliasEvent, ExpertVersion, Ref, as_utc, parse_ref, utcnow, validate_alias
from .state import bump_state, default_actor
from .versions import DEFAULT_ALIAS, find_expert, find_version, view_for
from .views import AliasEventView, ExpertVersionView


def move_alias(
    session: Session,
    expert_id: int,
    alias: str,
    target: ExpertVersion | None,
    action: str,
    actor: str | None,
    reason: str,
) -> None:
    """Point `alias` at `target` (None removes it) and record the move; a no-op move records nothing."""
    current = session.exec(
        select(Alias).where(Alias.expert_id == expert_id, Alias.alias == alias).with_for_update()
    ).first()
    from_version = session.get(ExpertVersion, current.version_id).version if current else None  # type: ignore[union-attr]
    to_version = target.version if target else None
    if from_version == to_version:
        return
    now, actor = utcnow(), actor or default_actor()
    if target is None:
        session.delete(current)
    elif current is None:
        session.add(
            Alias(expert_id=expert_id, alias=alias, version_id=target.id, updated_at=now, updated_by=actor)
        )
    else:
        current.version_id, current.updated_at, current.updated_by = target.id, now, actor
    session.add(
        AliasEvent(
            expert_id=expert_id,
            alias=alias,
            action=action,
            from_version=from_version,
            to_version=to_version,
            actor=actor,
            reason=reason,
            created_at=now,
        )
    )
    session.flush()


def promote(
    engine: Engine, ref: str, alias: str = DEFAULT_ALIAS, actor: str | None = None, reason: str = ""
) -> ExpertVersionView:
    """Point `alias` of the expert at the version `ref` names (recorded in the alias history)."""
    validate_alias(alias)
    parsed = parse_ref(ref)

    def work(session: Session) -> ExpertVersionView:
        bump_state(session)
        find_expert(session, parsed.name, lock=True)
        row = find_version(session, parsed, ref)
        if row.archived:
            raise ConflictError(f"{parsed.name}@{row.version} is archived; restore it before promoting it")
        move_alias(session, row.expert_id, alias, row, "promote", actor, reason)
        return view_for(session, row)

    return db.run_transaction(engine, work)


def previous_holder(session: Session, expert_id: int | None, alias: str) -> int | None:
    """The version that held `alias` before its current holder, replaying the history (None if none)."""
    events = session.exec(
        select(AliasEvent)
        .where(AliasEvent.expert_id == expert_id, AliasEvent.alias == alias)
        .order_by(AliasEvent.id)
    ).all()
    previous: list[int | None] = []
    for event in events:  # replay: every move pushes the old holder, every rollback pops one
        if event.from_version == event.to_version:
            continue  # a note that moved nothing (a guardrail stop while prod already was the control)
        if event.action == "rollback":
            if previous:
                previous.pop()
        else:
            previous.append(event.from_version)
    return previous[-1] if previous else None


def rollback(
    engine: Engine, name: str, alias: str = DEFAULT_ALIAS, actor: str | None = None, reason: str = ""
) -> ExpertVersionView:
    """Move `alias` back to the version that held it before the current holder."""
    validate_alias(alias)

    def work(session: Session) -> ExpertVersionView:
        bump_state(session)
        expert = find_expert(session, name, lock=True)
        target_version = previous_holder(session, expert.id, alias)
        if target_version is None:
            raise ConflictError(
                f"{name}@{alias} has no previous holder to roll back to; use `moea registry promote`"
            )
        row = find_version(session, Ref(name, version=target_version), f"{name}@{target_version}")
        if row.archived:
            raise ConflictError(
                f"the previous holder {name}@{target_version} is archived; restore it or promote a version explicitly"
            )
        move_alias(session, expert.id, alias, row, "rollback", actor, reason)
        return view_for(session, row)

    return db.run_transaction(engine, work)


def remove_alias(engine: Engine, name: str, alias: str, actor: str | None = None, reason: str = "") -> None:
    """Delete an alias (kept in history); `name` then resolves to its latest version."""
    validate_alias(alias)

    def work(session: Session) -> None:
        bump_state(session)
        expert = find_expert(session, name, lock=True)
        move_alias(session, expert.id, alias, None, "remove", actor, reason)

    db.run_transaction(engine, work)


def history(engine: Engine, name: str, alias: str | None = None) -> list[AliasEventView]:
    """The append-only alias history of `name`, oldest first."""
    with Session(engine) as session:
        expert = find_expert(session, name)
        query = select(AliasEvent).where(AliasEvent.expert_id == expert.id)
        if alias is not None:
            query = query.where(AliasEvent.alias == validate_alias(alias))
        return [
            AliasEventView(
                name=expert.name,
                alias=e.alias,
                action=e.action,
                from_version=e.from_version,
                to_version=e.to_version,
                actor=e.actor,
                reason=e.reason,
                created_at=as_utc(e.created_at),
            )
            for e in session.exec(query.order_by(AliasEvent.id)).all()
        ]
