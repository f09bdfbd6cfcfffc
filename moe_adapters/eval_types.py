"""What every part of `moea eval` shares: its settings, one test case, and the systems it compares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BASE = "base"
TEST, UNSEEN, OOD = "test", "unseen", "ood"
SYSTEM_ORDER = ("base", "oracle", "moe", "served", "multitask", "random")
GENERATED_SYSTEMS = ("base", "oracle", "moe", "multitask", "random")
"""Systems eval generates itself; ``served`` is the live endpoint (``EvalSettings.endpoint``)."""


class EvalError(RuntimeError):
    """The evaluation cannot run; the message says how to fix it."""


@dataclass
class EvalSettings:
    """How `moea eval` generates and what it compares."""

    max_new_tokens: int = 96
    """Tokens generated per answer (greedy)."""
    max_examples_per_task: int | None = 200
    """Cap on test rows per task (first N of the deterministic split); None = all."""
    systems: tuple[str, ...] = GENERATED_SYSTEMS
    """Systems to score; `multitask` is skipped when no multi-task adapter exists."""
    endpoint: str | None = None
    """A running `moea serve` (`http://host:port/v1`): its answers to the same client messages are scored
    as system ``served``, next to ``moe`` (what eval predicts it returns)."""
    endpoint_model: str = "moe"
    """`model=` sent to the endpoint."""
    endpoint_api_key: str | None = None
    """Bearer token for the endpoint."""
    seed: int = 0
    """Seed of the uniform random routing baseline."""
    router_device: str | None = "cpu"
    """Where the router runs during eval (cpu keeps the accelerator for vLLM)."""
    max_model_len: int = 1024
    """vLLM context length (prompt + answer)."""
    worker_timeout_s: float = 3600.0
    """Give up on the vLLM child process after this long."""
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra `vllm.LLM(...)` arguments (e.g. {"gpu_memory_utilization": 0.5})."""


@dataclass
class EvalCase:
    """One test row of one task (``split`` "test"), one row of its ``unseen_test_file`` ("unseen"), or
    one prompt of the mixture's ``ood_test_file`` ("ood": routed only, never generated; ``task`` holds
    the prompt's category)."""

    task: str
    kind: str
    prompt: str
    """The last user message (what the router reads)."""
    messages: list[dict[str, str]]
    """What the client sends: the row's own messages up to and including that user message."""
    reference: str
    replay: bool
    extra: dict[str, Any] = field(default_factory=dict)
    """The row's ``eval_fields`` columns (``test_list`` for code, ``references`` for qa)."""
    template: int | None = None
    """Index of the template the row was rendered with (tasks with ``templates``); None otherwise."""
    template_text: str | None = None
    """That template's text, for the per-template report."""
    split: str = "test"
    """``test``, ``unseen`` or ``ood``."""


def system_rank(system: str) -> int:
    return SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)
