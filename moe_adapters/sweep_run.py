"""Running a sweep (:mod:`moe_adapters.sweep`): every expert's trials, then one ordinary run dir holding the
winners, so ``moea eval RUN`` and ``moea register RUN`` work unchanged.

Layout of the run dir::

    RUN/sweep/<task>/mixture.yaml           the mixture with that task alone (plus the replay data)
    RUN/sweep/<task>/trial-NN/              an ordinary run dir of one trial (+ trial.json)
    RUN/experts/<task>/                     a copy of the winning trial's adapter
    RUN/router/, metrics.json, mixture.yaml, run.json   as after `moea train` (router trained once)
    RUN/sweep.json, sweep.md, sweep.png     every trial's numbers, the winners, the plot

A sweep stopped part-way continues when started again with the same ``--out``: finished trials are
reused (their ``trial.json`` must match), a trial with a checkpoint resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from moe_adapters.base_model import resolve_base_model
from moe_adapters.checkpoint import check_out_dir
from moe_adapters.config import LoraSettings, MixtureConfig
from moe_adapters.config_load import load_mixture, mixture_yaml
from moe_adapters.parallel import LAUNCHER_ENV
from moe_adapters.run_dir import RUN_MARKER, fsync_tree, run_dir_state, write_json_atomic
from moe_adapters.sweep import (
    SWEEP_METRIC,
    SweepConfig,
    SweepError,
    Trial,
    load_sweep,
    sweep_markdown,
    winners,
)
from moe_adapters.train import _load_tokenizer, train_mixture
from moe_adapters.train_outputs import mixture_run_record

SWEEP_DIR = "sweep"


def sweep_mixture(
    mixture_path: Path,
    sweep_path: Path,
    out_dir: Path,
    *,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Run every expert's trials of ``sweep_path`` and write run dir ``out_dir`` with the winners."""
    wall_start = time.perf_counter()
    if int(os.environ.get(LAUNCHER_ENV, "1")) > 1:
        raise SweepError(
            "--sweep runs its trials in one process: start it without accelerate launch / torchrun"
        )
    out_dir = Path(out_dir).expanduser().resolve()
    check_out_dir(out_dir, resume=False)
    config = load_mixture(mixture_path, overrides)
    tr = config.train
    sweep, trials = load_sweep(sweep_path, {"lr": tr.lr, "r": config.lora.r, "steps": tr.max_steps})
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in config.expert_tasks:
        task_dir = out_dir / SWEEP_DIR / task.name
        task_mixture = write_task_mixture(config, task.name, task_dir)
        for trial in trials:
            print(
                f"sweep: {task.name} {trial.name} ({trial.index + 1}/{len(trials)}) "
                f"lr={trial.lr:.3g} r={trial.r} steps={trial.steps}",
                file=sys.stderr,
                flush=True,
            )
            rows.append(run_trial(task_mixture, task.name, trial, sweep, config.lora, task_dir, progress))
    chosen = winners(rows)
    missing = [t.name for t in config.expert_tasks if t.name not in chosen]
    if missing:
        raise SweepError(
            f"no trial of {missing} has a validation loss (no validation rows?): give the task val rows "
            "(splits.val > 0 or val_file); the trials are kept in the run dir's sweep/"
        )
    write_sweep_run(out_dir, config, sweep, Path(sweep_path), rows, chosen, time.perf_counter() - wall_start)
    return out_dir


def write_task_mixture(config: MixtureConfig, task: str, task_dir: Path) -> Path:
    """The resolved mixture with ``task`` as its only expert (replay tasks kept, recipes and router off)."""
    single = copy.deepcopy(config)
    single.tasks = [t for t in config.tasks if t.name == task or t.replay]
    single.router.enabled = False
    single.train.recipes_off()
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / "mixture.yaml"
    path.write_text(mixture_yaml(single))
    return path


def trial_overrides(trial: Trial, sweep: SweepConfig, lora: LoraSettings) -> dict[str, Any]:
    """The mixture settings of one trial; ``lora.alpha`` keeps the mixture's alpha/r ratio, so a change of
    r does not also change the update's scale."""
    overrides: dict[str, Any] = {
        "train.lr": trial.lr,
        "lora.r": trial.r,
        "lora.alpha": max(1, round(lora.alpha * trial.r / lora.r)),
        "train.max_steps": trial.steps,
        "train.patience": sweep.patience,
    }
    if sweep.eval_every is not None:
        overrides["train.eval_every"] = sweep.eval_every
    return overrides


def run_trial(
    task_mixture: Path,
    task: str,
    trial: Trial,
    sweep: SweepConfig,
    lora: LoraSettings,
    task_dir: Path,
    progress: bool,
) -> dict[str, Any]:
    """Train (or reuse, or resume) one trial and return its table row."""
    trial_dir = task_dir / trial.name
    overrides = trial_overrides(trial, sweep, lora)
    record = {"task": task, "trial": trial.index, "overrides": overrides}
    state = run_dir_state(trial_dir)
    trial_json = trial_dir / "trial.json"
    if state in ("finished", "resumable"):
        previous = json.loads(trial_json.read_text()) if trial_json.is_file() else None
        if previous != record:
            raise SweepError(
                f"{trial_dir} holds a trial of another sweep or mixture: use a new --out (nothing was changed)"
            )
    if state != "finished":
        if state != "resumable" and trial_dir.exists():
            shutil.rmtree(trial_dir)  # stopped before its first checkpoint: nothing to keep
        trial_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(trial_json, record)
        train_mixture(
            task_mixture, trial_dir, resume=state == "resumable", overrides=overrides, progress=progress
        )
    metrics = json.loads((trial_dir / "metrics.json").read_text())
    expert = metrics["experts"][task]
    return {
        "task": task,
        "trial": trial.index,
        "lr": trial.lr,
        "r": trial.r,
        "steps": trial.steps,
        "steps_taken": expert["steps"],
        "stopped_early": expert["stopped_early"],
        SWEEP_METRIC: expert["best_val_loss"],
        "wall_s": metrics["train"]["wall_s"],
    }


def write_sweep_run(
    out_dir: Path,
    config: MixtureConfig,
    sweep: SweepConfig,
    sweep_path: Path,
    rows: list[dict[str, Any]],
    chosen: dict[str, int],
    wall_s: float,
) -> None:
    """Copy the winners into ``experts/``, train the router once, write the tables, the plot, metrics.json,
    mixture.yaml and (last, as the completion marker) run.json."""
    from moe_adapters.plots import plot_sweep

    experts, data = {}, {}
    for task, index in chosen.items():
        trial_dir = out_dir / SWEEP_DIR / task / f"trial-{index:02d}"
        _copy_tree(trial_dir / "experts" / task, out_dir / "experts" / task)
        trial_metrics = json.loads((trial_dir / "metrics.json").read_text())
        experts[task] = {**trial_metrics["experts"][task], "sweep_trial": index}
        data.update(trial_metrics["data"])
    summary = {
        "metric": SWEEP_METRIC,
        "metric_help": "token-weighted response cross-entropy on the task's validation rows (lower is better)",
        "method": sweep.method,
        "sweep_file": str(sweep_path.resolve()),
        "trials": rows,
        "winners": {
            task: next(r for r in rows if r["task"] == task and r["trial"] == i) for task, i in chosen.items()
        },
    }
    write_json_atomic(out_dir / "sweep.json", summary)
    (out_dir / "sweep.md").write_text(sweep_markdown(rows, chosen))
    plot_sweep(rows, chosen, out_dir / "sweep.png")
    base_path = resolve_base_model(None if config.base_model == "default" else config.base_model)
    metrics: dict[str, Any] = {
        "experts": experts,
        "train": {"wall_s": wall_s, "trials": len(rows)},
        "data": data,
        "sweep": {k: summary[k] for k in ("metric", "method", "winners")},
    }
    if config.router.enabled:
        from moe_adapters.data import load_mixture_data
        from moe_adapters.router_step import train_router_on_data

        router_start = time.perf_counter()
        router_data = load_mixture_data(config, _load_tokenizer(base_path))
        metrics["router"] = train_router_on_data(config, router_data, out_dir, base_path)
        metrics["train"]["router_wall_s"] = time.perf_counter() - router_start
    mixture_text = mixture_yaml(config)
    (out_dir / "mixture.yaml").write_text(mixture_text)
    write_json_atomic(out_dir / "metrics.json", metrics)
    sweep_sha = hashlib.sha256(sweep_path.read_bytes()).hexdigest()
    run = mixture_run_record(
        config, base_path, hashlib.sha256((mixture_text + sweep_sha).encode()).hexdigest()
    )
    run["sweep"] = {"file_sha256": sweep_sha, "table": "sweep.json"}
    fsync_tree(out_dir)
    write_json_atomic(out_dir / RUN_MARKER, run)


def _copy_tree(source: Path, target: Path) -> None:
    """Copy folder ``source`` to ``target`` atomically (temp folder + rename), replacing ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
