"""The read-only views the registry returns, and the records the gateway writes into its request log.

Views are frozen dataclasses so callers can never mutate registry state by accident; they carry plain
values only (no sessions, no lazy loading).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class FileView:
    """One file of an artifact folder."""

    relpath: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ExpertVersionView:
    """An expert version as callers see it. `ref` is `name@version` (also the vLLM LoRA name)."""

    name: str
    version: int
    sha256: str
    base_model: str
    metrics: dict[str, Any]
    created_at: datetime
    aliases: list[str]
    archived: bool
    base_model_name: str | None = None
    base_model_sha256: str | None = None
    task_kind: str = "generation"
    system_prompt: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    run_dir: str | None = None
    mixture_sha256: str | None = None
    git_commit: str | None = None
    parent_version: int | None = None
    created_by: str | None = None
    size: int = 0
    files: tuple[FileView, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ExpertView:
    """An expert with a summary of its versions and aliases."""

    name: str
    description: str
    task_kind: str
    base_model: str
    base_model_sha256: str | None
    created_at: datetime
    latest_version: int | None
    version_count: int
    aliases: dict[str, int]


@dataclass(frozen=True)
class ServedExpertView:
    """An expert as a gateway serves it: its aliases, the versions its name resolves to without a number,
    and those versions' views (``Registry.served_experts``); not every version it has."""

    name: str
    latest_version: int | None
    """The newest live version (`name@latest`), None when it has none."""
    serving_version: int | None
    """What plain `name` resolves to: the holder of alias prod, else the newest live version (None: neither)."""
    aliases: dict[str, int]
    versions: dict[int, ExpertVersionView]
    """Version → view, for the alias holders, the newest live version and the extra versions asked for
    that exist (archived ones included); other versions are not read."""


@dataclass(frozen=True)
class RouterVersionView:
    """A router version; `experts` maps each label to the `name@version` it was registered with."""

    version: int
    sha256: str
    encoder: str | None
    labels: list[str]
    metrics: dict[str, Any]
    experts: dict[str, str]
    created_at: datetime
    archived: bool = False
    run_dir: str | None = None
    files: tuple[FileView, ...] = ()

    @property
    def ref(self) -> str:
        return f"router@{self.version}"


@dataclass(frozen=True)
class AliasEventView:
    """One alias move from the append-only history."""

    name: str
    alias: str
    action: str
    from_version: int | None
    to_version: int | None
    actor: str | None
    reason: str
    created_at: datetime


@dataclass(frozen=True)
class RegisterResult:
    """What one `register_run` created."""

    experts: list[ExpertVersionView]
    router: RouterVersionView | None


@dataclass(frozen=True)
class Arm:
    """An experiment arm: a version and its traffic weight."""

    version: int
    weight: float


@dataclass(frozen=True)
class ExperimentView:
    """An A/B experiment over versions of one expert."""

    id: int
    expert: str
    arms: list[Arm]
    metric: str
    salt: str
    status: str
    shadow_version: int | None
    started_at: datetime
    stopped_at: datetime | None
    winner: int | None
    guardrails: list[str] = field(default_factory=list)
    """Guardrail specs, e.g. ``error_rate<=0.02`` (grammar: serving/ab/guardrails.py)."""
    guard_settings: dict[str, float] = field(default_factory=dict)
    ramp: list[float] = field(default_factory=list)
    """Treatment shares in percent per ramp step; empty when the weights are fixed."""
    ramp_step: int = 0
    ramp_started: list[datetime] = field(default_factory=list)
    """When each step reached so far began (index = step)."""
    stop_reason: str = ""
    """Why it stopped, when a guardrail stopped it (empty for a manual stop)."""

    @property
    def step_started_at(self) -> datetime | None:
        """When the current ramp step began (None without a ramp)."""
        return self.ramp_started[-1] if self.ramp_started else None


@dataclass
class RequestRecord:
    """One served request, as the gateway logs it."""

    request_id: str
    created_at: datetime
    expert: str | None
    version: int | None
    experiment_id: int | None
    user: str | None
    routed: bool
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    status_code: int
    shadow: bool = False
    key_name: str | None = None
    """Name of the API key that made the request (the gateway's `--api-key NAME:KEY`), never the key."""
    messages: Any = None
    """With `moea serve --log-content` only: the client's messages as sent (for /v1/completions the
    prompt), stored in the ``request_content`` table with `answer`. None: no content is stored."""
    answer: str | None = None
    """With `messages`: the answer text (first choice; assembled from the stream of a streamed answer)."""


CONTENT_FIELDS = ("messages", "answer")
"""The RequestRecord fields that go to the ``request_content`` table, not to ``requests``."""


@dataclass
class OutcomeRecord:
    """Feedback for a request."""

    request_id: str
    created_at: datetime
    reward: float | None = None
    thumbs: bool | None = None
    outcome_id: str | None = None
    """Idempotency key: an outcome with an id already stored is not inserted again (None: always inserted)."""
    key_name: str | None = None
    """Name of the API key that sent the rating, never the key."""
    override: bool = False
    """May replace a rating another key gave first (an admin key's rating); not stored."""


@dataclass(frozen=True)
class RatingState:
    """What the request log says about rating one response (the gateway's /v1/feedback checks)."""

    request_id: str
    owner: str | None
    """Name of the key that made the request (None: made without auth, or before keys had names)."""
    rated: bool
    """Some outcome is recorded for it."""
    rater: str | None
    """Name of the key whose rating stands (the latest outcome's), when `rated`."""


def rating_accepted(current: tuple[str | None] | None, key_name: str | None, override: bool) -> bool:
    """The first rating of a response stands: a new one is taken when there is none yet (`current` is
    None), when it comes from the key that gave the standing one (`current == (key_name,)`: an update)
    or when it may override (an admin key)."""
    return current is None or override or current == (key_name,)


@dataclass(frozen=True)
class GoldenSetView:
    """A golden set attached to an expert (`moea registry attach-eval`)."""

    name: str
    version: int
    sha256: str
    """sha256 of the JSONL file (the cache key of eval scores)."""
    rows: int
    filename: str
    created_at: datetime
    created_by: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name} golden v{self.version} ({self.sha256[:12]}…)"


@dataclass(frozen=True)
class EvalScoreView:
    """An expert version's cached score on a golden set, with the probes the gateway checks on load."""

    name: str
    version: int
    golden_sha256: str
    metric: str
    score: float
    n: int
    probes: list[dict[str, Any]]
    """The first rows: ``{"messages": [...], "answer": str, "max_tokens": int}`` (greedy answers)."""
    settings: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class LoggedAnswer:
    """One logged, answered request of an expert with the rating that stands and its content (when
    `moea serve --log-content` stored it); what `moea feedback export` pairs up."""

    request_id: str
    created_at: datetime
    expert: str
    version: int | None
    experiment_id: int | None
    user: str | None
    reward: float | None
    thumbs: bool | None
    """The standing rating (the latest outcome of the request)."""
    messages: Any = None
    """The client's messages (None: no content logged, or purged)."""
    answer: str | None = None

    @property
    def has_content(self) -> bool:
        return self.messages is not None and self.answer is not None
