"""The registry as the gateway serves it: an in-memory snapshot (:class:`ServingState`, rebuilt by the
gateway's watcher whenever ``registry.state_token()`` changes) and where one request goes (:class:`Target`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from moe_adapters.prompting import PromptSpec, expert_messages


@dataclass(frozen=True)
class ExpertEntry:
    """What the gateway knows about one expert."""

    name: str
    serving: Any | None
    """ExpertVersionView that `model=NAME` gets (alias prod; latest only for an expert without prod, see
    registry/register.py); None when none is servable."""
    versions: dict[int, Any]
    aliases: dict[str, int]
    latest: int | None


@dataclass(frozen=True)
class ServingState:
    """A consistent snapshot of the registry for serving (rebuilt when the state token changes)."""

    token: str
    experts: dict[str, ExpertEntry]
    experiments: dict[str, Any]
    """Expert name → running ExperimentView."""
    router: Any | None
    """RouterVersionView to serve, or None."""
    required: dict[str, str]
    """Adapters every engine keeps loaded (serving versions, experiment arms, shadows) → artifact folder."""


READ_ATTEMPTS = 10
"""How often :func:`load_state` re-reads when writes keep landing while it reads."""


class StateUnsettled(RuntimeError):
    """The registry changed during every read of :func:`load_state` (the watcher tries again later)."""


def load_state(registry: Any, attempts: int = READ_ATTEMPTS) -> ServingState:
    """Read the registry into a :class:`ServingState` (blocking: run in a thread).

    The state is read with several registry calls, each its own read transaction, so a write landing in
    between would give a snapshot that mixes two registry states. Every serving-affecting write bumps
    the state token in its own transaction, so a read bracketed by the same token before and after saw
    one state only; otherwise it is read again.
    """
    for _ in range(attempts):
        token = registry.state_token()
        experiments, experts, required = _read_experts(registry)
        router = registry.latest_router()
        if registry.state_token() == token:
            paths = {view.ref: str(registry.artifact_path(view)) for view in required}  # content-addressed
            return ServingState(token, experts, experiments, router, paths)
    raise StateUnsettled(
        f"the registry changed during each of {attempts} reads of its state; still serving the previous state"
    )


def _read_experts(registry: Any) -> tuple[dict[str, Any], dict[str, ExpertEntry], list[Any]]:
    """Running experiments by expert, every expert's entry, and the versions that must stay loaded."""
    experiments = {exp.expert: exp for exp in registry.active_experiments()}
    experts: dict[str, ExpertEntry] = {}
    required: list[Any] = []
    every_version = registry.versions_by_expert()
    for expert in registry.list_experts():
        versions = {view.version: view for view in every_version.get(expert.name, [])}
        serving = None
        with contextlib.suppress(LookupError):
            serving = registry.resolve(expert.name)
        experts[expert.name] = ExpertEntry(
            expert.name, serving, versions, dict(expert.aliases), expert.latest_version
        )
        if serving is not None:
            required.append(serving)
        experiment = experiments.get(expert.name)
        if experiment is not None:
            arm_versions = [arm.version for arm in experiment.arms] + [experiment.shadow_version]
            required += [versions[v] for v in arm_versions if v is not None and v in versions]
    return experiments, experts, required


@dataclass(frozen=True)
class Target:
    """Where one request goes."""

    adapter: str | None
    """vLLM LoRA name `name@version`, or None for the base model."""
    expert: str | None = None
    version: int | None = None
    experiment_id: int | None = None
    routed: bool = False
    confidence: float | None = None
    path: str | None = None
    shadow_version: int | None = None
    prompt: PromptSpec | None = None
    """The version's system prompt and policy, applied to chat messages (None: messages as sent)."""
    system_prompt: str | None = None
    """Whose system prompt the model got: `expert`, `client`, `both` or None (see moe_adapters.prompting)."""

    @property
    def label(self) -> str:
        """`name@version` or `base` (header and metric label)."""
        return self.adapter or "base"

    def moea_field(self) -> dict[str, Any]:
        """The `moea` JSON field of the response (README "Module contracts")."""
        return {
            "expert": self.expert,
            "version": self.version,
            "routed": self.routed,
            "confidence": self.confidence,
            "system_prompt": self.system_prompt,
        }


def upstream_body(data: dict[str, Any], target: Target, model: str) -> dict[str, Any]:
    """The body forwarded to vLLM for `target`: its model name and, for chat, the messages the expert
    sees (one rule with training and `moea eval`: :func:`moe_adapters.prompting.expert_messages`)."""
    body = dict(data, model=model)
    if target.prompt is not None and isinstance(data.get("messages"), list):
        body["messages"] = expert_messages(data["messages"], target.prompt)
    return body
