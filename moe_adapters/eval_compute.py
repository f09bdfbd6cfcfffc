"""Training compute per eval system (tokens and optimizer steps), read from the runs' metrics.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .eval_data import read_metrics

EXPERT_SYSTEMS = ("oracle", "moe", "random")
"""Systems made of the run's experts: together they consumed the sum of the experts' training."""


def _consumed(entry: dict[str, Any] | None) -> dict[str, int | None]:
    entry = entry or {}
    return {"train_tokens": entry.get("train_tokens"), "steps": entry.get("steps")}


def training_compute(
    run_dir: Path,
    multitask_run: Path | None,
    systems: Sequence[str],
    experts_from_registry: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Training tokens and optimizer steps each system consumed, from the runs' metrics.json.

    ``base``: 0; ``oracle``/``moe``/``random``: the sum over the run's experts (``experts.<task>``);
    ``multitask``: the multi-task run's ``experts.multitask`` and its ``budget``; ``served``: unknown to
    eval (None). A missing metrics.json gives None, never a guess. Router training is not counted.
    """
    run_metrics = read_metrics(run_dir)
    experts = {
        task: _consumed(entry)
        for task, entry in ((run_metrics or {}).get("experts") or {}).items()
        if task != "multitask"
    }
    known = bool(experts) and all(
        e["train_tokens"] is not None and e["steps"] is not None for e in experts.values()
    )
    summed = {
        k: sum(e[k] or 0 for e in experts.values()) if known else None for k in ("train_tokens", "steps")
    }
    multitask_metrics = read_metrics(multitask_run)
    out: dict[str, Any] = {}
    for system in systems:
        if system == "base":
            out[system] = {"train_tokens": 0, "steps": 0, "source": "no training"}
        elif system in EXPERT_SYSTEMS:
            source = (
                f"sum over {len(experts)} experts"
                if known
                else f"{run_dir}/metrics.json missing or incomplete"
            )
            out[system] = {**summed, "source": source}
        elif system == "multitask":
            entry = ((multitask_metrics or {}).get("experts") or {}).get("multitask")
            budget = (multitask_metrics or {}).get("budget")
            source = "multi-task run" if entry else f"{multitask_run}/metrics.json has no experts.multitask"
            out[system] = {**_consumed(entry), "source": source, "budget": budget}
        else:
            out[system] = {"train_tokens": None, "steps": None, "source": "live endpoint: not known to eval"}
    return {
        "systems": out,
        "experts": experts,
        "note": (
            "experts from the registry replace run experts; their training compute is not in this run's "
            "metrics.json, so oracle/moe/random count the run's own experts"
        )
        if experts_from_registry
        else None,
    }
