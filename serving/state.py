"""The registry as the gateway serves it: an in-memory snapshot (:class:`ServingState`, rebuilt by the
gateway's watcher whenever ``registry.state_token()`` changes) and where one request goes (:class:`Target`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from moe_adapters.prompting import PromptSpec, expert_messages
from registry.errors import NotFoundError
from registry.models import VERSION_MAX


@dataclass(frozen=True)
class ExpertEntry:
    """What the gateway knows about one expert."""

    name: str
    serving: Any | None
    """ExpertVersionView that `model=NAME` gets (alias prod; latest only for an expert without prod, see
    registry/register.py); None when none is servable."""
    versions: dict[int, Any]
    """Version → ExpertVersionView for the versions the snapshot holds: alias holders, the newest live
    one, experiment arms and shadow (archived ones included). Other numbers (`NAME@3`) are looked up on
    request: :func:`pinned_version`."""
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
    pinned: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """`name@N` outside the snapshot → its ExpertVersionView (None: no such version) as of `token`, filled
    on request by :func:`pinned_version` (on the event loop; at most `PINNED_KEPT`)."""


PINNED_KEPT = 1024
"""Pinned versions (`name@N` outside the snapshot) a state remembers; the oldest is forgotten first."""

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

    Only the versions served without a number are read (``registry.served_experts``), so a refresh costs
    the same at 10 versions per expert as at 10,000 (benchmarks/bench_registry_scale.py).
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
    arms = {  # arms, then the shadow: the versions an experiment serves besides the expert's own
        name: [v for v in [*(arm.version for arm in exp.arms), exp.shadow_version] if v is not None]
        for name, exp in experiments.items()
    }
    experts: dict[str, ExpertEntry] = {}
    required: list[Any] = []
    for expert in registry.served_experts(arms):
        versions = expert.versions
        serving = versions.get(expert.serving_version)  # None: nothing servable
        experts[expert.name] = ExpertEntry(
            expert.name, serving, versions, expert.aliases, expert.latest_version
        )
        if serving is not None:
            required.append(serving)
        required += [versions[v] for v in arms.get(expert.name, ()) if v in versions]
    return experiments, experts, required


async def pinned_version(registry: Any, state: ServingState, name: str, version: int) -> Any | None:
    """The ExpertVersionView of `name@version` (an expert of `state`) as `state` serves it; None when the
    expert has no such version.

    Versions outside the snapshot (an old `NAME@3`) are read from the registry in a thread, bracketed by
    the state token like :func:`load_state`: read while the registry is still at the snapshot's token,
    the answer is the snapshot's and is remembered with the state (until the next one replaces it). Read
    after the registry moved on (the watcher is about to swap in the newer state, or holds it back), the
    answer is the registry's current one, used for this request only. A version's content never changes;
    what can (archived or not) is thus never older than the snapshot.
    """
    ref = f"{name}@{version}"
    view = state.experts[name].versions.get(version)
    if view is not None or version > VERSION_MAX:  # beyond the column: no such version (nor SQLite bind)
        return view
    if ref in state.pinned:
        return state.pinned[ref]
    view, current = await asyncio.to_thread(_read_pinned, registry, ref, state.token)
    if current:
        if len(state.pinned) >= PINNED_KEPT:
            del state.pinned[next(iter(state.pinned))]
        state.pinned[ref] = view
    return view


def _read_pinned(registry: Any, ref: str, token: str) -> tuple[Any | None, bool]:
    """(view or None, whether it was read at `token`)."""
    before = registry.state_token()
    try:
        view = registry.resolve(ref, include_archived=True)
    except NotFoundError:
        view = None
    return view, before == token == registry.state_token()


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
    view: Any | None = field(default=None, compare=False, repr=False)
    """The version's ExpertVersionView (its artifact is what a pinned adapter loads from, when `path` is None)."""

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
