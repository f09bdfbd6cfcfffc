"""Training recipes' pure decisions: keep-if-better per task, and which adapter serves each task.

The training side (shared warm-up phase, weight copies) lives in :mod:`moe_adapters.shared_phase`; this
module holds what can be decided from plain numbers, so training, router training and ``moea eval`` agree:

- :func:`keep_if_better` compares each expert's validation loss with the shared adapter's;
- :func:`serving_adapters` turns the decisions into ``{task: adapter}`` (the task's own expert or
  ``shared``), recorded as ``metrics.json`` ``recipe.serving``;
- :func:`relabel_router_prompts` relabels a losing task's prompts to ``shared`` before router training, so the
  router's labels are exactly the served adapters (the registry and the gateway need no label map);
- :func:`read_serving` reads the map back (identity for runs without the recipe).
"""

from __future__ import annotations

import math
from typing import Any

from moe_adapters.config import SHARED_ADAPTER

RECIPE_METRIC = "val_loss"
"""What keep-if-better compares by default: token-weighted response cross-entropy on the task's validation
rows (``train.keep_if_better_by: val_loss``); ``val_metric``: :func:`keep_if_better_by_metric`."""


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def keep_if_better(
    expert_losses: dict[str, float | None], shared_losses: dict[str, float | None]
) -> dict[str, dict[str, Any]]:
    """Per task: keep the expert only where its val loss is strictly lower than the shared adapter's.

    A task without a finite expert or shared loss (no validation rows) keeps its expert: nothing shows the
    shared adapter is better. Returns ``{task: {expert_val_loss, shared_val_loss, kept, reason}}``.
    """
    decisions = {}
    for task, raw_expert in expert_losses.items():
        expert, shared = _finite(raw_expert), _finite(shared_losses.get(task))
        if expert is None or shared is None:
            kept, reason = True, "no validation loss to compare: expert kept"
        elif expert < shared:
            kept, reason = True, "expert has the lower val loss"
        else:
            kept, reason = False, "shared adapter's val loss is lower or equal"
        decisions[task] = {
            "expert_val_loss": expert,
            "shared_val_loss": shared,
            "kept": kept,
            "reason": reason,
        }
    return decisions


def keep_if_better_by_metric(
    expert_scores: dict[str, dict[str, Any] | None],
    shared_scores: dict[str, dict[str, Any] | None],
    losses: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Per task: keep the expert only where its greedy answers to the task's validation rows score strictly
    higher (the task kind's headline metric, :mod:`moe_adapters.recipe_metric`) than the shared adapter's.

    A tie goes to the shared adapter, as with the loss; a task without validation rows keeps its expert.
    ``losses`` are :func:`keep_if_better`'s decisions, whose val losses are recorded alongside.
    """
    decisions = {}
    for task, expert in expert_scores.items():
        shared = shared_scores.get(task)
        if expert is None or shared is None:
            kept, reason = True, "no validation rows to score: expert kept"
        elif expert["score"] > shared["score"]:
            kept, reason = True, f"expert has the higher val {expert['metric']}"
        else:
            kept, reason = False, f"shared adapter's val {shared['metric']} is higher or equal"
        decisions[task] = {
            "expert_val_loss": losses[task]["expert_val_loss"],
            "shared_val_loss": losses[task]["shared_val_loss"],
            "val_metric": (expert or shared or {}).get("metric"),
            "expert_val_metric": None if expert is None else expert["score"],
            "shared_val_metric": None if shared is None else shared["score"],
            "kept": kept,
            "reason": reason,
        }
    return decisions


def serving_adapters(decisions: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{task: adapter}``: the task's own expert where it was kept, else ``shared``."""
    return {task: task if d["kept"] else SHARED_ADAPTER for task, d in decisions.items()}


def relabel_router_prompts(
    prompts: dict[str, list[str]], serving: dict[str, str] | None
) -> dict[str, list[str]]:
    """Prompts per router label: each task's prompts under the adapter that serves it (tasks in order)."""
    merged: dict[str, list[str]] = {}
    for task, texts in prompts.items():
        merged.setdefault((serving or {}).get(task, task), []).extend(texts)
    return merged


def read_serving(metrics: dict[str, Any] | None) -> dict[str, str]:
    """``metrics.json`` ``recipe.serving`` (``{}`` when absent: every task is served by its own expert)."""
    recipe = (metrics or {}).get("recipe") or {}
    serving = recipe.get("serving") or {}
    return {str(task): str(adapter) for task, adapter in serving.items()}


def format_decisions(decisions: dict[str, dict[str, Any]]) -> list[str]:
    """One printable line per task."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = []
    for task, d in decisions.items():
        by = ""
        if "val_metric" in d:
            by = f"val {d['val_metric']} {fmt(d['expert_val_metric'])} vs shared {fmt(d['shared_val_metric'])}; "
        lines.append(
            f"keep-if-better {task}: {by}expert val loss {fmt(d['expert_val_loss'])} vs shared "
            f"{fmt(d['shared_val_loss'])} -> {'expert kept' if d['kept'] else 'served by shared'}"
        )
    return lines
