"""The router's training at the end of a run: each task's prompts (every template's wording), filed under
the adapter serving the task, with replay prompts as examples for the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_adapters.config import MixtureConfig
from moe_adapters.data import MixtureData, TaskData
from moe_adapters.data_rows import Row
from moe_adapters.recipes import relabel_router_prompts
from moe_adapters.templates import render_all
from moe_adapters.train_state import Trainer


def train_router_for_run(
    trainer: Trainer, out_dir: Path, base_path: str, serving: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train the router on the experts' raw prompts.

    ``serving`` ({task: adapter}, keep-if-better) files a task's prompts under the adapter serving it, so
    every router label is an ``experts/`` folder (a task served by ``shared`` is routed to ``shared``).
    """
    return train_router_on_data(trainer.config, trainer.data, out_dir, base_path, serving)


def train_router_on_data(
    config: MixtureConfig,
    data: MixtureData,
    out_dir: Path,
    base_path: str,
    serving: dict[str, str] | None = None,
) -> dict[str, Any]:
    """:func:`train_router_for_run` from the mixture and its data alone (the router needs no adapter; a
    sweep, :mod:`moe_adapters.sweep_run`, trains it once for the winners)."""
    from moe_adapters.router_training import train_router  # torch + the encoder: only when a run ends

    tasks = [t.name for t in config.expert_tasks]
    train = relabel_router_prompts(
        {t: router_prompts(data.tasks[t], data.tasks[t].train) for t in tasks}, serving
    )
    val = relabel_router_prompts(
        {t: router_prompts(data.tasks[t], data.tasks[t].val) for t in tasks}, serving
    )
    # Replay prompts are general requests: good out-of-scope examples that should go to the base model.
    negatives = [r.prompt for t in config.replay_tasks for r in data.tasks[t.name].train]
    return train_router(
        train, val, out_dir / "router", config.router, base_model=base_path, negatives=negatives
    )


def router_prompts(task: TaskData, rows: list[Row]) -> list[str]:
    """The prompts the router learns a task from: every template's wording of each row of a templated
    task (so it learns the task, not the one wording a row was drawn with), else each row's prompt.

    ``router.max_train_per_task`` still caps what the router encodes (a deterministic subsample)."""
    templates = task.config.templates or []
    return [
        prompt
        for row in rows
        for prompt in (render_all(templates, row.template.input) if row.template else [row.prompt])
    ]
