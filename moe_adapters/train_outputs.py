"""What a finished training run writes: the adapters (experts/, candidates/), metrics.json,
train_curves.png, the router, and last, as the completion marker, run.json."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from moe_adapters.base_model import DEFAULT_BASE_NAME, base_model_sha256
from moe_adapters.config import MixtureConfig
from moe_adapters.router_step import train_router_for_run
from moe_adapters.run_dir import RUN_MARKER, fsync_tree, write_json_atomic
from moe_adapters.train_state import ExpertState, Trainer

RUN_FORMAT_VERSION = 1
"""run.json ``format_version`` (README "Run dir")."""


def save_expert(trainer: Trainer, expert: ExpertState, folder: Path, base_path: str) -> None:
    """Write the expert's best weights as a standard PEFT adapter directly in ``folder`` (atomic)."""
    from peft import set_peft_model_state_dict

    if expert.best_state is not None:
        set_peft_model_state_dict(trainer.model, expert.best_state, adapter_name=expert.adapter)
    write_adapter_folder(trainer.model, expert.adapter, folder, base_path)


def write_adapter_folder(model: Any, adapter: str, folder: Path, base_path: str) -> None:
    """Write adapter ``adapter`` of PEFT ``model`` as a standard PEFT adapter directly in ``folder``
    (atomic: a temp folder renamed into place)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    # PEFT's save_pretrained nests non-default adapters in sub-folders; write the two files ourselves.
    weights = get_peft_model_state_dict(model, adapter_name=adapter)
    lora_config = copy.deepcopy(model.peft_config[adapter])
    lora_config.base_model_name_or_path = base_path
    lora_config.inference_mode = True
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            str(tmp / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        lora_config.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapters(trainer: Trainer, out_dir: Path, base_path: str, recipe: dict[str, Any] | None) -> None:
    """Save every adapter, placed by ``recipe`` (:func:`moe_adapters.shared_phase.recipe_record`; None
    without a shared warm-up).

    Served adapters go to ``experts/<name>/``. With a shared warm-up, the shared adapter goes to
    ``experts/shared/`` where keep-if-better gave it a task, else to ``candidates/shared/``; an expert that
    lost to it goes to ``candidates/<task>/`` (kept for inspection, never registered).
    """
    served = set(recipe["serving"].values()) if recipe is not None else set(trainer.experts)
    for name, expert in trainer.experts.items():
        folder = out_dir / ("experts" if name in served else "candidates") / name
        save_expert(trainer, expert, folder, base_path)


def expert_metrics(trainer: Trainer) -> dict[str, dict[str, Any]]:
    """metrics.json ``experts`` section."""
    out = {}
    for name, e in trainer.experts.items():
        tail = [v for _, v in e.train_curve[-max(1, trainer.config.train.log_every) :]]
        out[name] = {
            "steps": e.steps,
            "best_val_loss": None if math.isinf(e.best_val_loss) else e.best_val_loss,
            "final_train_loss": sum(tail) / len(tail) if tail else None,
            "stopped_early": e.stopped_early,
            "train_tokens": e.tokens,
            "tokens_per_s": e.tokens / e.step_time_s if e.step_time_s else 0.0,
            "tasks": e.tasks,
        }
    return out


def throughput(trainer: Trainer) -> dict[str, float]:
    """Training throughput: tokens (incl. prompt, excl. padding) per second of step time."""
    tokens = sum(e.tokens for e in trainer.experts.values())
    return {
        "tokens_per_s": tokens / trainer.train_time_s if trainer.train_time_s else 0.0,
        "train_tokens": tokens,
        "step_time_s": trainer.train_time_s,
        "steps": trainer.global_step,
    }


def finalize_run(
    trainer: Trainer,
    out_dir: Path,
    base_path: str,
    mixture_sha: str,
    single_adapter: bool,
    wall_s: float,
    recipe: dict[str, Any] | None,
) -> None:
    """Write experts/, router/, metrics.json, train_curves.png and (last, atomically, as the completion
    marker) run.json. ``recipe``: :func:`moe_adapters.shared_phase.recipe_record`, computed before (by every
    rank of a multi-process run: its evaluations are collective)."""
    from moe_adapters.plots import plot_training_curves

    save_adapters(trainer, out_dir, base_path, recipe)
    metrics = run_metrics(trainer, recipe, wall_s)
    if not single_adapter and trainer.config.router.enabled:
        router_start = time.perf_counter()
        serving = (recipe or {}).get("serving")
        metrics["router"] = train_router_for_run(trainer, out_dir, base_path, serving)
        metrics["train"]["router_wall_s"] = time.perf_counter() - router_start
    write_json_atomic(out_dir / "metrics.json", metrics)
    plot_training_curves(
        {n: e.train_curve for n, e in trainer.experts.items()},
        {n: e.val_curve for n, e in trainer.experts.items()},
        out_dir / "train_curves.png",
    )
    run = run_record(trainer, base_path, mixture_sha, single_adapter)
    # run.json is the completion marker (run_dir_state): everything it vouches for reaches the disk first,
    # and it appears whole or not at all.
    fsync_tree(out_dir)
    write_json_atomic(out_dir / RUN_MARKER, run)


def run_metrics(trainer: Trainer, recipe: dict[str, Any] | None, wall_s: float) -> dict[str, Any]:
    """metrics.json without its ``router`` section: experts, throughput, data counts, budget and recipe."""
    metrics: dict[str, Any] = {
        "experts": expert_metrics(trainer),
        "train": {
            **throughput(trainer),
            "wall_s": wall_s,
            "device": str(trainer.device),
            "torch_threads": torch.get_num_threads(),
        },
        "data": {
            n: {
                "rows_loaded": t.rows_loaded,
                "duplicates_dropped": t.duplicates_dropped,
                "train": len(t.train),
                "val": len(t.val),
                "test": len(t.test),
                "long_rows": dict(t.long_rows),
            }
            for n, t in trainer.data.tasks.items()
        },
    }
    if trainer.budget is not None:
        metrics["budget"] = trainer.budget
    if recipe is not None:
        metrics["recipe"] = recipe
    return metrics


def run_record(trainer: Trainer, base_path: str, mixture_sha: str, single_adapter: bool) -> dict[str, Any]:
    """run.json of a training run (:func:`mixture_run_record` with the trainer's mixture and budget)."""
    return mixture_run_record(trainer.config, base_path, mixture_sha, single_adapter, trainer.budget)


def mixture_run_record(
    config: MixtureConfig,
    base_path: str,
    mixture_sha: str,
    single_adapter: bool = False,
    budget: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """run.json: the base model, the mixture's hash, the commit and each task's prompt settings."""
    return {
        **run_header(config, base_path, mixture_sha),
        "single_adapter": single_adapter,
        **({"budget": budget} if budget is not None else {}),
        "tasks": {
            t.name: {"kind": t.kind, "system_prompt": t.system_prompt, "prompt_policy": t.prompt_policy}
            for t in config.expert_tasks
        },
    }


def run_header(config: MixtureConfig, base_path: str, mixture_sha: str) -> dict[str, Any]:
    """The fields every run.json starts with (training and DPO runs): format, base model, time, commit."""
    return {
        "format_version": RUN_FORMAT_VERSION,
        "base_model": base_path,
        "base_model_name": DEFAULT_BASE_NAME if config.base_model == "default" else Path(base_path).name,
        "base_model_sha256": base_model_sha256(base_path),
        "created_at": datetime.now(UTC).isoformat(),
        "mixture_sha256": mixture_sha,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
