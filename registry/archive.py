"""Archive (soft-delete) and restore expert versions; versions themselves are never deleted."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import Session, select

from . import db
from .aliases import move_alias
from .errors import ConflictError, ValidationError
from .experiments import running_experiment
from .models import Alias, parse_ref, utcnow
from .state import bump_state
from .versions import find_expert, find_version, view_for
from .views import ExpertVersionView


def archive(
    engine: Engine, ref: str, force: bool = False, actor: str | None = None, reason: str = ""
) -> ExpertVersionView:
    """Soft-delete `name@version`. A version holding an alias needs `force` (which removes the aliases)."""
    parsed = parse_ref(ref)
    if parsed.version is None:
        raise ValidationError(f"archive needs an explicit version, e.g. {parsed.name}@3 (got {ref!r})")

    def work(session: Session) -> ExpertVersionView:
        bump_state(session)
        expert = find_expert(session, parsed.name, lock=True)
        row = find_version(session, parsed, ref)
        aliases = session.exec(select(Alias).where(Alias.version_id == row.id)).all()
        if aliases and not force:
            names = ", ".join(sorted(a.alias for a in aliases))
            raise ConflictError(
                f"{ref} holds alias {names}; promote another version first or pass --force to drop the alias"
            )
        running = running_experiment(session, expert.id)
        if running and row.version in {arm["version"] for arm in running.arms} | {running.shadow_version}:
            raise ConflictError(
                f"{ref} is in running experiment {running.id}; stop it first (`moea ab stop {parsed.name}`)"
            )
        for alias in aliases:
            move_alias(session, expert.id, alias.alias, None, "remove", actor, reason or f"archived {ref}")
        row.archived, row.archived_at = True, utcnow()
        session.add(row)
        session.flush()
        return view_for(session, row)

    return db.run_transaction(engine, work)


def restore(engine: Engine, ref: str, actor: str | None = None) -> ExpertVersionView:
    """Undo `archive` for `name@version`."""
    parsed = parse_ref(ref)
    if parsed.version is None:
        raise ValidationError(f"restore needs an explicit version, e.g. {parsed.name}@3 (got {ref!r})")

    def work(session: Session) -> ExpertVersionView:
        bump_state(session)
        row = find_version(session, parsed, ref)
        row.archived, row.archived_at = False, None
        session.add(row)
        session.flush()
        return view_for(session, row)

    return db.run_transaction(engine, work)
