"""What an expert sees: the one rule that turns a client's chat messages into the expert's input.

Training, ``moea eval`` and the serving gateway all call :func:`expert_messages` with the expert's
:class:`PromptSpec` (its task's ``system_prompt`` and ``prompt_policy``, recorded with every registered
version), so an expert is served with exactly the instruction it was trained with. Token ids are then
made by the base tokenizer's chat template: :func:`render_chat` here, vLLM's chat endpoint when serving.

Policies (mixture ``tasks[].prompt_policy``, default ``if-absent``):

- ``if-absent``: the system prompt goes first when the messages carry no system message of their own;
  a client's own system message wins.
- ``prepend``: the system prompt always goes first; a client's own system message is appended to it
  (one system message: many chat templates accept only one).
- ``never``: messages are used as given; the expert has no system prompt of its own (data whose rows
  carry their own system messages).

Pure Python (no torch): the gateway imports it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

PromptPolicy = Literal["if-absent", "prepend", "never"]
PROMPT_POLICIES: tuple[str, ...] = typing.get_args(PromptPolicy)
SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class PromptSpec:
    """What shapes an expert's prompt, besides the base model's chat template."""

    system_prompt: str | None = None
    """The task's instruction as a system message; None: none."""
    policy: PromptPolicy = "if-absent"
    """How the system prompt meets a request's own system message (module docstring)."""

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> PromptSpec | None:
        """The spec stored with a run's task / a registered version (``{"system_prompt", "prompt_policy"}``);
        None when there is no system prompt (nothing to apply)."""
        policy = (record or {}).get("prompt_policy") or "if-absent"
        if policy not in PROMPT_POLICIES:
            raise ValueError(f"prompt_policy {policy!r} is not one of {list(PROMPT_POLICIES)}")
        system_prompt = (record or {}).get("system_prompt")
        return cls(system_prompt, policy) if system_prompt else None

    def as_record(self) -> dict[str, Any]:
        """The JSON form kept in run.json and the registry (inverse of :meth:`from_record`)."""
        return {"system_prompt": self.system_prompt, "prompt_policy": self.policy}


def version_prompt_spec(view: Any) -> PromptSpec | None:
    """The spec recorded with a registered expert version (its ``system_prompt`` and the run's task record)."""
    task = (getattr(view, "config", None) or {}).get("task") or {}
    return PromptSpec.from_record({**task, "system_prompt": view.system_prompt})


def expert_messages(messages: Sequence[Mapping[str, Any]], spec: PromptSpec | None) -> list[dict[str, Any]]:
    """The messages the expert sees for a client's ``messages`` (new list; the input is not modified).

    ``spec`` None (the base model, or an adapter without a spec) leaves the messages as they are.
    """
    out = [dict(m) for m in messages]
    if spec is None or not spec.system_prompt or spec.policy == "never":
        return out
    own = out[0] if out and out[0].get("role") in SYSTEM_ROLES else None
    if own is None:
        return [{"role": "system", "content": spec.system_prompt}, *out]
    if spec.policy == "if-absent" or any(m.get("role") in SYSTEM_ROLES for m in out[1:]):
        return out
    content = own.get("content")
    if isinstance(content, str):
        own["content"] = f"{spec.system_prompt}\n\n{content}" if content else spec.system_prompt
    else:  # content parts: put the expert's instruction first as a text part
        own["content"] = [{"type": "text", "text": spec.system_prompt}, *(content or [])]
    return out


def system_prompt_source(messages: Sequence[Mapping[str, Any]], spec: PromptSpec | None) -> str | None:
    """Whose system prompt the expert got: ``expert``, ``client``, ``both`` (prepend) or None (none)."""
    has_own = any(m.get("role") in SYSTEM_ROLES for m in messages)
    if expert_messages(messages, spec) != [dict(m) for m in messages]:
        return "both" if has_own else "expert"
    return "client" if has_own else None


def render_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, generation_prompt: bool = True
) -> str:
    """Chat-templated text of ``messages`` (ending with the assistant header when ``generation_prompt``).

    The same template vLLM's chat endpoint applies for the served model.
    """
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
    )
