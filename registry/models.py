"""Registry tables (sqlmodel) and name validation; the read-only views are in `registry/views.py`.

Tables are the schema at alembic head; `registry/migrations/versions/` must produce exactly this
(tests compare them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Float, Index, Integer, String, Text
from sqlalchemy import UniqueConstraint as Unique
from sqlmodel import Field, SQLModel

from .errors import ValidationError

NAME_MAX = 64
KEY_NAME_MAX = 64
ALIAS_MAX = 32
VERSION_MAX = 2**31 - 1
"""The largest version number the ``version`` columns hold (32-bit INTEGER on PostgreSQL)."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_VERSION_RE = re.compile(r"^v?([0-9]+)$")
RESERVED_ALIASES = frozenset({"latest"})


def utcnow() -> datetime:
    """Timezone-aware now in UTC (what every timestamp column stores)."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for UTC values; make them aware again."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def validate_name(name: str, what: str = "expert name") -> str:
    """Return `name` if it is a safe expert name, else raise ValidationError saying what is allowed."""
    if not isinstance(name, str) or not name:
        raise ValidationError(f"{what} is empty; use letters, digits, '_', '-' or '.'")
    if len(name) > NAME_MAX or not _NAME_RE.match(name) or ".." in name:
        raise ValidationError(
            f"invalid {what} {name[:80]!r}: use 1-{NAME_MAX} characters from letters, digits, '_', '-', '.', "
            "starting with a letter or digit, without '..' or path separators"
        )
    return name


def validate_alias(alias: str) -> str:
    """Return `alias` if it is a valid alias name (lowercase, not 'latest', not a version number)."""
    if (
        not isinstance(alias, str)
        or not 0 < len(alias) <= ALIAS_MAX
        or not _ALIAS_RE.match(alias)
        or alias in RESERVED_ALIASES
        or _VERSION_RE.match(alias)
    ):
        raise ValidationError(
            f"invalid alias {str(alias)[:80]!r}: use 1-{ALIAS_MAX} lowercase letters, digits, '_' or '-', "
            "starting with a letter; 'latest' and version-like names such as 'v3' are reserved"
        )
    return alias


@dataclass(frozen=True)
class Ref:
    """A parsed reference: `name`, `name@latest`, `name@<alias>` or `name@<version>`."""

    name: str
    version: int | None = None
    alias: str | None = None
    latest: bool = False


def parse_ref(ref: str) -> Ref:
    """Parse `name[@selector]`; selector is 'latest', a version number (3 or v3) or an alias."""
    if not isinstance(ref, str) or not ref:
        raise ValidationError("empty reference; use NAME, NAME@latest, NAME@<alias> or NAME@<version>")
    name, sep, selector = ref.partition("@")
    validate_name(name)
    if not sep:
        return Ref(name)
    if selector == "latest":
        return Ref(name, latest=True)
    match = _VERSION_RE.match(selector)
    if match:
        version = int(match.group(1))
        if not 1 <= version <= VERSION_MAX:
            raise ValidationError(f"invalid version in {ref!r}: versions go from 1 to {VERSION_MAX}")
        return Ref(name, version=version)
    return Ref(name, alias=validate_alias(selector))


def _json_column(**kwargs: Any) -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=False, **kwargs))


def _ts(nullable: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_type=DateTime(timezone=True), nullable=True)
    return Field(default_factory=utcnow, sa_type=DateTime(timezone=True), nullable=False)


# ---------------------------------------------------------------- foundation schema (revision 0001)


class Expert(SQLModel, table=True):
    """One named expert (a task); its versions hold the artifacts."""

    __tablename__ = "experts"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=String(NAME_MAX), nullable=False, unique=True)
    description: str = Field(default="", sa_type=Text, nullable=False)
    task_kind: str = Field(default="generation", sa_type=String(32), nullable=False)
    base_model: str = Field(default="", sa_type=String(1024), nullable=False)
    base_model_sha256: str | None = Field(default=None, sa_type=String(64), nullable=True)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Artifact(SQLModel, table=True):
    """A content-addressed folder: `sha256` is the hash of its canonical tree manifest."""

    __tablename__ = "artifacts"
    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(sa_type=String(64), nullable=False, unique=True)
    kind: str = Field(sa_type=String(16), nullable=False)
    size: int = Field(sa_type=BigInteger, nullable=False)
    file_count: int = Field(sa_type=Integer, nullable=False)
    created_at: datetime = _ts()


class ArtifactFile(SQLModel, table=True):
    """One file of an artifact folder, stored as blob `sha256` in the store."""

    __tablename__ = "artifact_files"
    __table_args__ = (Unique("artifact_id", "relpath", name="uq_artifact_files_artifact_relpath"),)
    id: int | None = Field(default=None, primary_key=True)
    artifact_id: int = Field(foreign_key="artifacts.id", nullable=False)
    relpath: str = Field(sa_type=String(512), nullable=False)
    sha256: str = Field(sa_type=String(64), nullable=False, index=True)
    size: int = Field(sa_type=BigInteger, nullable=False)


class ExpertVersion(SQLModel, table=True):
    """An immutable version of an expert. `version` is assigned inside the write transaction."""

    __tablename__ = "expert_versions"
    __table_args__ = (Unique("expert_id", "version", name="uq_expert_versions_expert_version"),)
    id: int | None = Field(default=None, primary_key=True)
    expert_id: int = Field(foreign_key="experts.id", nullable=False)
    version: int = Field(sa_type=Integer, nullable=False)
    artifact_id: int = Field(foreign_key="artifacts.id", nullable=False)
    sha256: str = Field(sa_type=String(64), nullable=False)
    base_model: str = Field(default="", sa_type=String(1024), nullable=False)
    base_model_name: str | None = Field(default=None, sa_type=String(256), nullable=True)
    base_model_sha256: str | None = Field(default=None, sa_type=String(64), nullable=True)
    metrics: dict = _json_column()
    config: dict = _json_column()
    tags: dict = _json_column()
    run_dir: str | None = Field(default=None, sa_type=String(4096), nullable=True)
    mixture_sha256: str | None = Field(default=None, sa_type=String(64), nullable=True)
    git_commit: str | None = Field(default=None, sa_type=String(64), nullable=True)
    parent_version: int | None = Field(default=None, sa_type=Integer, nullable=True)
    """The version this one was trained from (``moea train --dpo --from``; ``config.lineage`` has the
    record); None when trained from the base model or imported (revision 0008)."""
    created_at: datetime = _ts()
    created_by: str | None = Field(default=None, sa_type=String(128), nullable=True)
    # revision 0002
    archived: bool = Field(default=False, sa_type=Boolean, nullable=False)
    archived_at: datetime | None = _ts(nullable=True)


class RouterVersion(SQLModel, table=True):
    """An immutable router version; `router_experts` records the expert versions it was trained against."""

    __tablename__ = "router_versions"
    id: int | None = Field(default=None, primary_key=True)
    version: int = Field(sa_type=Integer, nullable=False, unique=True)
    artifact_id: int = Field(foreign_key="artifacts.id", nullable=False)
    sha256: str = Field(sa_type=String(64), nullable=False)
    encoder: str | None = Field(default=None, sa_type=String(1024), nullable=True)
    labels: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    metrics: dict = _json_column()
    run_dir: str | None = Field(default=None, sa_type=String(4096), nullable=True)
    mixture_sha256: str | None = Field(default=None, sa_type=String(64), nullable=True)
    git_commit: str | None = Field(default=None, sa_type=String(64), nullable=True)
    created_at: datetime = _ts()
    created_by: str | None = Field(default=None, sa_type=String(128), nullable=True)
    # revision 0002
    archived: bool = Field(default=False, sa_type=Boolean, nullable=False)


class RouterExpert(SQLModel, table=True):
    """Router label → the expert version that label was registered with."""

    __tablename__ = "router_experts"
    __table_args__ = (Unique("router_version_id", "label", name="uq_router_experts_router_label"),)
    id: int | None = Field(default=None, primary_key=True)
    router_version_id: int = Field(foreign_key="router_versions.id", nullable=False)
    label: str = Field(sa_type=String(NAME_MAX), nullable=False)
    expert_version_id: int = Field(foreign_key="expert_versions.id", nullable=False)


# ---------------------------------------------------------------- revision 0002


class Alias(SQLModel, table=True):
    """`name@alias` → one version; UNIQUE(expert, alias) means two versions can never hold one alias."""

    __tablename__ = "aliases"
    __table_args__ = (Unique("expert_id", "alias", name="uq_aliases_expert_alias"),)
    id: int | None = Field(default=None, primary_key=True)
    expert_id: int = Field(foreign_key="experts.id", nullable=False)
    alias: str = Field(sa_type=String(ALIAS_MAX), nullable=False)
    version_id: int = Field(foreign_key="expert_versions.id", nullable=False)
    updated_at: datetime = _ts()
    updated_by: str | None = Field(default=None, sa_type=String(128), nullable=True)


class AliasEvent(SQLModel, table=True):
    """Append-only history of alias moves (never updated or deleted)."""

    __tablename__ = "alias_history"
    id: int | None = Field(default=None, primary_key=True)
    expert_id: int = Field(foreign_key="experts.id", nullable=False, index=True)
    alias: str = Field(sa_type=String(ALIAS_MAX), nullable=False)
    action: str = Field(sa_type=String(16), nullable=False)
    from_version: int | None = Field(default=None, sa_type=Integer, nullable=True)
    to_version: int | None = Field(default=None, sa_type=Integer, nullable=True)
    actor: str | None = Field(default=None, sa_type=String(128), nullable=True)
    reason: str = Field(default="", sa_type=Text, nullable=False)
    created_at: datetime = _ts()


class Experiment(SQLModel, table=True):
    """An A/B experiment over versions of one expert; at most one is running per expert."""

    __tablename__ = "experiments"
    __table_args__ = (
        Index(
            "uq_experiments_one_running",
            "expert_id",
            unique=True,
            sqlite_where=Column("status", String) == "running",
            postgresql_where=Column("status", String) == "running",
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    expert_id: int = Field(foreign_key="experts.id", nullable=False)
    arms: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    metric: str = Field(default="reward", sa_type=String(16), nullable=False)
    salt: str = Field(sa_type=String(64), nullable=False)
    status: str = Field(default="running", sa_type=String(16), nullable=False)
    shadow_version: int | None = Field(default=None, sa_type=Integer, nullable=True)
    winner: int | None = Field(default=None, sa_type=Integer, nullable=True)
    started_at: datetime = _ts()
    stopped_at: datetime | None = _ts(nullable=True)
    created_by: str | None = Field(default=None, sa_type=String(128), nullable=True)
    # revision 0003: guardrails (specs as typed, see serving/ab/guardrails.py) and the traffic ramp
    guardrails: list = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    guard_settings: dict = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False, server_default="{}")
    )
    """alpha, min_units, step_s, step_units: how the gateways judge guardrails and advance the ramp."""
    ramp: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"))
    """Treatment shares in percent, one per step (empty: no ramp)."""
    ramp_step: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    ramp_started: list = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    """ISO 8601 UTC time each ramp step reached so far began (index = step)."""
    stop_reason: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))


class RequestLog(SQLModel, table=True):
    """One served request (written in batches by the gateway). (request_id, shadow) is unique, so the
    gateway's spool can re-insert a batch after a crash and each request is still logged once."""

    __tablename__ = "requests"
    __table_args__ = (Index("uq_requests_request_id_shadow", "request_id", "shadow", unique=True),)
    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(sa_type=String(128), nullable=False, index=True)
    created_at: datetime = _ts()
    expert: str | None = Field(default=None, sa_type=String(NAME_MAX), nullable=True)
    version: int | None = Field(default=None, sa_type=Integer, nullable=True)
    experiment_id: int | None = Field(default=None, sa_type=Integer, nullable=True, index=True)
    user: str | None = Field(default=None, sa_type=String(256), nullable=True)
    routed: bool = Field(default=False, sa_type=Boolean, nullable=False)
    latency_ms: float = Field(default=0.0, sa_type=Float, nullable=False)
    prompt_tokens: int = Field(default=0, sa_type=Integer, nullable=False)
    completion_tokens: int = Field(default=0, sa_type=Integer, nullable=False)
    status_code: int = Field(default=200, sa_type=Integer, nullable=False)
    shadow: bool = Field(default=False, sa_type=Boolean, nullable=False)
    key_name: str | None = Field(default=None, sa_type=String(KEY_NAME_MAX), nullable=True)
    """Name of the gateway API key that made the request (never the key); None without auth."""


class Outcome(SQLModel, table=True):
    """Feedback for a request: a reward and/or thumbs up/down. ``outcome_id`` (unique when set; the
    gateway sets one per feedback call) makes re-inserting a spooled outcome a no-op."""

    __tablename__ = "outcomes"
    __table_args__ = (Index("uq_outcomes_outcome_id", "outcome_id", unique=True),)
    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(sa_type=String(128), nullable=False, index=True)
    created_at: datetime = _ts()
    reward: float | None = Field(default=None, sa_type=Float, nullable=True)
    thumbs: bool | None = Field(default=None, sa_type=Boolean, nullable=True)
    outcome_id: str | None = Field(default=None, sa_type=String(64), nullable=True)
    key_name: str | None = Field(default=None, sa_type=String(KEY_NAME_MAX), nullable=True)
    """Name of the gateway API key that sent the rating (never the key); None without auth."""


class RegistryState(SQLModel, table=True):
    """A single row whose counter is bumped by every write that affects serving (see state_token)."""

    __tablename__ = "registry_state"
    id: int = Field(default=1, primary_key=True)
    counter: int = Field(default=0, sa_type=BigInteger, nullable=False)
    updated_at: datetime = _ts()


# ---------------------------------------------------------------- revision 0006


class GoldenSet(SQLModel, table=True):
    """A golden set attached to an expert (`moea registry attach-eval`): one JSONL file in the store
    (artifact of kind ``golden``); attaching again adds the next version, the newest one is used."""

    __tablename__ = "golden_sets"
    __table_args__ = (Unique("expert_id", "version", name="uq_golden_sets_expert_version"),)
    id: int | None = Field(default=None, primary_key=True)
    expert_id: int = Field(foreign_key="experts.id", nullable=False)
    version: int = Field(sa_type=Integer, nullable=False)
    artifact_id: int = Field(foreign_key="artifacts.id", nullable=False)
    sha256: str = Field(sa_type=String(64), nullable=False)
    """sha256 of the JSONL file's bytes (what `sha256sum FILE` prints)."""
    rows: int = Field(sa_type=Integer, nullable=False)
    filename: str = Field(sa_type=String(512), nullable=False)
    created_at: datetime = _ts()
    created_by: str | None = Field(default=None, sa_type=String(128), nullable=True)


class EvalScore(SQLModel, table=True):
    """An expert version's score on one golden set (by content hash), computed once and cached; `probes`
    holds the first rows' messages and greedy answers, which the gateway checks when it loads the version."""

    __tablename__ = "eval_scores"
    __table_args__ = (Unique("expert_version_id", "golden_sha256", name="uq_eval_scores_version_golden"),)
    id: int | None = Field(default=None, primary_key=True)
    expert_version_id: int = Field(foreign_key="expert_versions.id", nullable=False)
    golden_sha256: str = Field(sa_type=String(64), nullable=False)
    metric: str = Field(sa_type=String(64), nullable=False)
    score: float = Field(sa_type=Float, nullable=False)
    n: int = Field(sa_type=Integer, nullable=False)
    probes: list = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    settings: dict = _json_column()
    created_at: datetime = _ts()
    created_by: str | None = Field(default=None, sa_type=String(128), nullable=True)


# ---------------------------------------------------------------- revision 0007


class RequestContent(SQLModel, table=True):
    """What was said in one logged request (`moea serve --log-content` only): the client's messages and the
    answer text. Keyed like its request row, (request_id, shadow), and written in the same transaction, so
    the spool's re-inserts store it once; `moea registry purge-content` deletes rows, the request rows stay."""

    __tablename__ = "request_content"
    __table_args__ = (
        Index("uq_request_content_request_id_shadow", "request_id", "shadow", unique=True),
        Index("ix_request_content_created_at", "created_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(sa_type=String(128), nullable=False)
    shadow: bool = Field(default=False, sa_type=Boolean, nullable=False)
    created_at: datetime = _ts()
    messages: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The client's chat messages as sent (before the expert's system prompt is added); for
    /v1/completions the prompt."""
    answer: str | None = Field(default=None, sa_type=Text, nullable=True)
    """The first choice's text (assembled from the events of a streamed answer); None when there was none."""
