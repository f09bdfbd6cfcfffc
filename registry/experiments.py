"""A/B experiments: start, stop (optionally promoting the winner) and read; at most one runs per expert."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlmodel import Session, col, select

from . import db
from .aliases import move_alias
from .errors import ConflictError, NotFoundError, ValidationError
from .experiment_metrics import EXPERIMENT_METRICS
from .models import Alias, AliasEvent, Experiment, Expert, ExpertVersion, Ref, as_utc, utcnow, validate_name
from .state import bump_state, default_actor
from .versions import DEFAULT_ALIAS, find_expert, find_version
from .views import Arm, ExperimentView


def _parse_arms(arms: Sequence[tuple[int, float]], metric: str, shadow_version: int | None) -> list[Arm]:
    """Validate everything that needs no database: the metric, the weights, repeated or shadowed versions."""
    if metric not in EXPERIMENT_METRICS:
        raise ValidationError(f"unknown metric {metric!r}; use one of {', '.join(EXPERIMENT_METRICS)}")
    parsed_arms = [Arm(int(v), float(w)) for v, w in arms]
    if not parsed_arms or any(not math.isfinite(a.weight) or a.weight <= 0 for a in parsed_arms):
        raise ValidationError(
            "experiment arms need at least one VERSION:WEIGHT with a positive finite weight"
        )
    versions = [a.version for a in parsed_arms]
    if len(set(versions)) != len(versions):
        raise ValidationError(f"experiment arms repeat a version: {versions}")
    if shadow_version is not None and shadow_version in versions:
        raise ValidationError(
            f"shadow version {shadow_version} is also an arm; pick a version outside the arms"
        )
    return parsed_arms


def _apply_ramp(arms: list[Arm], ramp: list[float]) -> list[Arm]:
    """The arms weighted by the ramp's first step (unchanged without a ramp)."""
    if not ramp:
        return arms
    if len(arms) != 2:
        raise ValidationError(f"a ramp needs exactly two arms (control, treatment), got {len(arms)}")
    if any(not 0 < s <= 100 for s in ramp) or any(b <= a for a, b in zip(ramp, ramp[1:], strict=False)):
        raise ValidationError(f"ramp {ramp} must be increasing treatment shares in (0, 100]")
    return ramp_arms(arms, ramp[0])


def start_experiment(
    engine: Engine,
    expert: str,
    arms: Sequence[tuple[int, float]],
    metric: str = "reward",
    salt: str | None = None,
    shadow_version: int | None = None,
    actor: str | None = None,
    guardrails: Sequence[str] = (),
    ramp: Sequence[float] = (),
    guard_settings: dict[str, float] | None = None,
) -> ExperimentView:
    """Start an A/B experiment over versions of `expert`; at most one runs per expert.

    `guardrails` are stored as given (serving/ab/guardrails.py parses and checks them); a `ramp` of
    treatment shares (percent, increasing) needs exactly two arms and replaces their weights by
    ``100 - ramp[0]`` and ``ramp[0]``; the gateways advance it (:func:`advance_ramp`).
    """
    parsed_arms = _parse_arms(arms, metric, shadow_version)
    ramp = [float(share) for share in ramp]
    parsed_arms = _apply_ramp(parsed_arms, ramp)
    versions = [a.version for a in parsed_arms]

    def work(session: Session) -> ExperimentView:
        bump_state(session)
        row = find_expert(session, expert, lock=True)
        running = running_experiment(session, row.id)
        if running:
            raise ConflictError(f"experiment {running.id} is already running for {expert}; stop it first")
        for version in [*versions, *([shadow_version] if shadow_version is not None else [])]:
            found = find_version(session, Ref(row.name, version=version), f"{expert}@{version}")
            if found.archived:
                raise ConflictError(
                    f"{expert}@{version} is archived; restore it before experimenting with it"
                )
        experiment = Experiment(
            expert_id=row.id,
            arms=[asdict(a) for a in parsed_arms],
            metric=metric,
            salt=salt or secrets.token_hex(8),
            shadow_version=shadow_version,
            created_by=actor or default_actor(),
            guardrails=list(guardrails),
            guard_settings=dict(guard_settings or {}),
            ramp=ramp,
            ramp_started=[utcnow().isoformat()] if ramp else [],
        )
        session.add(experiment)
        session.flush()
        return experiment_view(experiment, row.name)

    try:
        return db.run_transaction(engine, work)
    except SAIntegrityError:
        raise ConflictError(
            f"another experiment was started for {expert} at the same time; stop it first"
        ) from None


def running_experiment(session: Session, expert_id: int | None) -> Experiment | None:
    """The running experiment row of the expert, if any."""
    return session.exec(
        select(Experiment).where(Experiment.expert_id == expert_id, Experiment.status == "running")
    ).first()


def experiment_view(row: Experiment, expert: str) -> ExperimentView:
    """The view of an experiment row of `expert`."""
    return ExperimentView(
        id=row.id or 0,
        expert=expert,
        arms=[Arm(int(a["version"]), float(a["weight"])) for a in row.arms],
        metric=row.metric,
        salt=row.salt,
        status=row.status,
        shadow_version=row.shadow_version,
        started_at=as_utc(row.started_at),
        stopped_at=as_utc(row.stopped_at),
        winner=row.winner,
        guardrails=list(row.guardrails or []),
        guard_settings=dict(row.guard_settings or {}),
        ramp=[float(share) for share in row.ramp or []],
        ramp_step=row.ramp_step or 0,
        ramp_started=[datetime.fromisoformat(when) for when in row.ramp_started or []],
        stop_reason=row.stop_reason or "",
    )


def _experiments(session: Session, *conditions: Any) -> list[ExperimentView]:
    query = sa_select(Experiment, Expert.name).join(Expert, col(Expert.id) == col(Experiment.expert_id))
    rows = session.exec(query.where(*conditions).order_by(col(Experiment.id))).all()
    return [experiment_view(experiment, name) for experiment, name in rows]


def active_experiment(engine: Engine, expert: str) -> ExperimentView | None:
    """The running experiment of `expert`, if any."""
    with Session(engine) as session:
        found = _experiments(session, Expert.name == validate_name(expert), Experiment.status == "running")
        return found[0] if found else None


def active_experiments(engine: Engine) -> list[ExperimentView]:
    """Every running experiment."""
    with Session(engine) as session:
        return _experiments(session, Experiment.status == "running")


def list_experiments(engine: Engine, expert: str | None = None) -> list[ExperimentView]:
    """All experiments (of one expert when given), oldest first."""
    with Session(engine) as session:
        conditions = [Expert.name == validate_name(expert)] if expert else []
        return _experiments(session, *conditions)


def get_experiment(engine: Engine, expert_or_id: str | int) -> ExperimentView:
    """An experiment by id (int, or digits that are not an expert name) or the latest one of an expert."""
    with Session(engine) as session:
        if (
            isinstance(expert_or_id, str)
            and session.exec(select(Expert.id).where(Expert.name == expert_or_id)).first()
        ):
            found = _experiments(session, Expert.name == expert_or_id)
            if found:
                return found[-1]
            raise NotFoundError(f"{expert_or_id} has no experiments; start one with `moea ab start`")
        if isinstance(expert_or_id, int) or str(expert_or_id).isdigit():
            found = _experiments(session, Experiment.id == int(expert_or_id))
            if found:
                return found[0]
        raise NotFoundError(f"no experiment or expert {expert_or_id!r}; see `moea ab list`")


def stop_experiment(
    engine: Engine, expert: str, winner: int | None = None, actor: str | None = None
) -> ExperimentView:
    """Stop the running experiment of `expert`; a `winner` version takes alias prod."""

    def work(session: Session) -> ExperimentView:
        bump_state(session)
        row = find_expert(session, expert, lock=True)
        experiment = running_experiment(session, row.id)
        if experiment is None:
            raise NotFoundError(f"no running experiment for {expert}; see `moea ab list`")
        if winner is not None:
            if winner not in {int(a["version"]) for a in experiment.arms}:
                raise ValidationError(f"winner {winner} is not an arm of experiment {experiment.id}")
            target = find_version(session, Ref(row.name, version=winner), f"{expert}@{winner}")
            move_alias(
                session, row.id, DEFAULT_ALIAS, target, "promote", actor, f"experiment {experiment.id} winner"
            )
        experiment.status, experiment.stopped_at, experiment.winner = "stopped", utcnow(), winner
        session.add(experiment)
        session.flush()
        return experiment_view(experiment, row.name)

    return db.run_transaction(engine, work)


def ramp_arms(arms: Sequence[Arm], share: float) -> list[Arm]:
    """The two arms weighted ``100 - share`` (control) and ``share`` (treatment).

    Assignment gives the control the buckets below ``round((100 - share) / 100 * N)`` and the treatment
    the rest, so a larger share only moves control users into the treatment, never the reverse.
    """
    control, treatment = arms
    return [Arm(control.version, 100.0 - share), Arm(treatment.version, float(share))]


def _running_by_id(session: Session, experiment_id: int) -> tuple[Experiment, Expert] | None:
    """The experiment (re-read under its expert's row lock) and its expert, while it is running."""
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        return None
    expert = session.exec(select(Expert).where(Expert.id == experiment.expert_id).with_for_update()).one()
    session.refresh(experiment)  # another gateway may have stopped or advanced it before the lock
    return (experiment, expert) if experiment.status == "running" else None


def advance_ramp(engine: Engine, experiment_id: int, from_step: int) -> ExperimentView | None:
    """Move the running experiment's ramp from `from_step` to the next step; None when it is not there.

    Compare-and-set on the step, so several gateways deciding at once advance it once.
    """

    def work(session: Session) -> ExperimentView | None:
        found = _running_by_id(session, experiment_id)
        if found is None:
            return None
        experiment, expert = found
        ramp = [float(share) for share in experiment.ramp or []]
        if experiment.ramp_step != from_step or from_step + 1 >= len(ramp):
            return None
        bump_state(session)
        arms = [Arm(int(a["version"]), float(a["weight"])) for a in experiment.arms]
        experiment.arms = [asdict(a) for a in ramp_arms(arms, ramp[from_step + 1])]
        experiment.ramp_step = from_step + 1
        experiment.ramp_started = [*(experiment.ramp_started or []), utcnow().isoformat()]
        session.add(experiment)
        session.flush()
        return experiment_view(experiment, expert.name)

    return db.run_transaction(engine, work)


def guardrail_stop(
    engine: Engine, experiment_id: int, reason: str, actor: str | None = None
) -> ExperimentView | None:
    """Stop a running experiment because a guardrail was breached: all traffic back to the control arm.

    The experiment stops with `reason`; alias prod moves to the control arm (the first arm), or stays
    there, and either way the alias history gets an event (action ``guardrail``) with the reason.
    Returns None when the experiment is no longer running (another gateway stopped it first).
    """

    def work(session: Session) -> ExperimentView | None:
        found = _running_by_id(session, experiment_id)
        if found is None:
            return None
        experiment, expert = found
        bump_state(session)
        control = int(experiment.arms[0]["version"])
        target = find_version(session, Ref(expert.name, version=control), f"{expert.name}@{control}")
        current = session.exec(
            select(ExpertVersion.version)
            .join(Alias, col(Alias.version_id) == col(ExpertVersion.id))
            .where(Alias.expert_id == expert.id, Alias.alias == DEFAULT_ALIAS)
        ).first()
        actor_name = actor or default_actor()
        if current == control:  # prod already serves the control: record why nothing moved
            session.add(
                AliasEvent(
                    expert_id=expert.id or 0,
                    alias=DEFAULT_ALIAS,
                    action="guardrail",
                    from_version=control,
                    to_version=control,
                    actor=actor_name,
                    reason=reason,
                    created_at=utcnow(),
                )
            )
        else:
            move_alias(session, expert.id or 0, DEFAULT_ALIAS, target, "guardrail", actor_name, reason)
        experiment.status, experiment.stopped_at, experiment.stop_reason = "stopped", utcnow(), reason
        session.add(experiment)
        session.flush()
        return experiment_view(experiment, expert.name)

    return db.run_transaction(engine, work)
