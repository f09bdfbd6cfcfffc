"""Which generations `moea eval` needs: the router's decision per case, the (adapter, case) requests of
every system (identical requests shared), and each request's prompt tokens."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .eval_types import GENERATED_SYSTEMS, OOD, EvalCase, EvalSettings
from .prompting import PromptSpec


@dataclass
class GenerationPlan:
    """Which (adapter, case) generations each system needs; identical requests are shared."""

    requests: list[tuple[str | None, int]] = field(default_factory=list)
    index: dict[tuple[str | None, int], int] = field(default_factory=dict)
    systems: dict[str, list[int]] = field(default_factory=dict)  # system → request id per case (-1: n/a)

    def need(self, adapter: str | None, case: int) -> int:
        key = (adapter, case)
        if key not in self.index:
            self.index[key] = len(self.requests)
            self.requests.append(key)
        return self.index[key]


def plan_requests(
    cases: list[EvalCase],
    routes: list[str | None],
    experts: dict[str, Path],
    multitask: Path | None,
    settings: EvalSettings,
    serving: dict[str, str] | None = None,
) -> GenerationPlan:
    """Requests per system; ``serving`` ({task: adapter}, keep-if-better) picks each task's oracle adapter."""
    plan = GenerationPlan()
    labels = sorted(experts)
    rng = random.Random(settings.seed)
    wanted = [
        s for s in settings.systems if s in GENERATED_SYSTEMS and (s != "multitask" or multitask is not None)
    ]
    for system in wanted:
        plan.systems[system] = [-1] * len(cases)
    for i, case in enumerate(cases):
        if case.split == OOD:
            continue  # out-of-distribution prompts are only routed: no reference to score against
        own = (serving or {}).get(case.task, case.task)
        own = own if own in experts else None
        choices: dict[str, str | None | bool] = {
            "base": None,
            "oracle": own if not case.replay else False,
            "moe": routes[i],
            "multitask": "multitask",
            "random": rng.choice(labels) if labels and not case.replay else False,
        }
        for system in wanted:
            adapter = choices[system]
            if adapter is False or (system == "oracle" and adapter is None):
                continue  # replay rows: base vs moe (and multitask) only; tasks without an expert: no oracle
            plan.systems[system][i] = plan.need(adapter, i)  # type: ignore[arg-type]
    return plan


def request_prompt_ids(
    tokenizer: Any,
    cases: list[EvalCase],
    requests: list[tuple[str | None, int]],
    specs: dict[str, PromptSpec | None],
) -> list[list[int]]:
    """Token ids of each (adapter, case) request: the case's client messages as the gateway would build
    them for that adapter (:func:`moe_adapters.data.render_prompt` → prompting.expert_messages)."""
    from .data_tokenize import render_prompt

    return [
        tokenizer(
            render_prompt(tokenizer, cases[c].messages, specs.get(adapter) if adapter else None),
            add_special_tokens=False,
        )["input_ids"]
        for adapter, c in requests
    ]


def route_cases(
    run_dir: Path, cases: list[EvalCase], experts: dict[str, Path], settings: EvalSettings
) -> tuple[list[str | None], dict[str, Any]]:
    """Router decisions per case (labels without an expert dir count as abstain)."""
    router_dir = run_dir / "router"
    if not (router_dir / "router.json").is_file():
        return [None] * len(cases), {"missing": True}
    from .router import Router

    router = Router.load(router_dir, device=settings.router_device)
    decisions = router.route([c.prompt for c in cases])
    routes = [d.label if d.label in experts else None for d in decisions]
    return routes, {
        "encoder_kind": router.encoder.kind,
        "threshold": router.threshold,
        "labels": router.labels,
    }
