"""Train one LoRA expert per task in a single run over one base model (or one multitask LoRA).

Each step the :class:`~moe_adapters.sampling.TaskSampler` draws a task; that task's adapter is activated
and updated with its own AdamW state and its own warmup + cosine schedule. Replay rows are mixed into
every batch. Experts are evaluated on their validation rows every ``eval_every`` of their own steps,
stop early after ``patience`` evaluations without improvement (and are no longer sampled), and keep
their best weights. Checkpoints are atomic and ``resume=True`` continues bit-for-bit.

Speed on a small model: batches are length-bucketed (little padding), the LM head and the loss run only
on response positions (prompt logits are never computed), and losses are read back from the device only
every ``log_every`` steps.

This module sets a run up and calls the parts in order: :mod:`~moe_adapters.train_state` (adapters,
optimizers, batchers), :mod:`~moe_adapters.train_loop` with :mod:`~moe_adapters.train_step`,
:mod:`~moe_adapters.shared_phase` (the shared warm-up recipe), :mod:`~moe_adapters.checkpoint` (resume),
:mod:`~moe_adapters.train_outputs` (adapters, metrics, curves, run.json) and
:mod:`~moe_adapters.router_step`; :mod:`~moe_adapters.hardware` picks device and threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moe_adapters.base_model import resolve_base_model
from moe_adapters.checkpoint import check_out_dir, load_checkpoint, read_checkpoint, resume_identity
from moe_adapters.config import SINGLE_ADAPTER_BUDGETS, MixtureConfig
from moe_adapters.config_load import load_mixture, mixture_yaml
from moe_adapters.data import MixtureData, load_mixture_data
from moe_adapters.hardware import apply_num_threads, pick_device
from moe_adapters.parallel import TEST_DIGEST_ENV, Parallel, adapter_digest, detect_parallel
from moe_adapters.quantize import QUANTIZE_4BIT, check_quantize_backend
from moe_adapters.run_dir import CHECKPOINT_NAME
from moe_adapters.sampling import temperature_probabilities
from moe_adapters.shared_phase import recipe_record, start_shared_phase
from moe_adapters.train_loop import run_training
from moe_adapters.train_outputs import finalize_run
from moe_adapters.train_state import Trainer, TrainError, build_trainer


# The run's phases in order, each one call; splitting the sequence would hide the order that matters.
def train_mixture(
    mixture_path: Path,
    out_dir: Path,
    *,
    resume: bool = False,
    single_adapter: bool = False,
    budget: str = "total",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Train all experts of ``mixture_path`` into run dir ``out_dir`` (see README "Module contracts") and return it.

    ``resume=True`` continues from ``out_dir/checkpoint.pt``; without a checkpoint it starts from step 0
    (one line on stderr) and on a finished run it refuses (see :func:`check_out_dir`);
    ``single_adapter=True`` trains one LoRA on all tasks (``experts/multitask/``, no router) for the
    steps its ``budget`` allows (:func:`single_adapter_max_steps`);
    ``overrides`` are dotted mixture keys, e.g. ``{"train.max_steps": 20}``.

    Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this and trains
    data-parallel (:mod:`moe_adapters.parallel`); only rank 0 writes the run dir, checkpoints and logs.
    """
    wall_start = time.perf_counter()
    parallel = detect_parallel()
    progress = progress and parallel.is_main
    out_dir = Path(out_dir).expanduser().resolve()
    state = check_out_dir(out_dir, resume)
    config = load_mixture(mixture_path, overrides)
    check_quantize_backend(config.train.quantize, parallel.device or pick_device()[0])
    if parallel.fsdp is not None and config.train.quantize == QUANTIZE_4BIT:
        raise TrainError("train.quantize=4bit does not combine with FSDP in moea: use FSDP, or 4bit with DDP")
    if (
        parallel.fsdp is not None
        and config.train.keep_if_better
        and config.train.keep_if_better_by == "val_metric"
    ):
        raise TrainError(
            "train.keep_if_better_by=val_metric does not combine with FSDP in moea (greedy generation on "
            "sharded layers): use val_loss, or DDP"
        )
    budget_record = apply_budget(config, single_adapter, budget)
    drop_recipes_for_single_adapter(config, single_adapter)
    checkpoint = out_dir / CHECKPOINT_NAME
    if parallel.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    base_path = resolve_base_model(None if config.base_model == "default" else config.base_model)
    tokenizer = _load_tokenizer(base_path)
    data = load_mixture_data(config, tokenizer, single_adapter=single_adapter)
    report_long_rows(data, config.train.long_rows, quiet=not parallel.is_main)
    expert_tasks = [t.name for t in config.expert_tasks]
    probabilities = temperature_probabilities(
        {t: data.sizes()[t] for t in expert_tasks}, config.sampling.temperature, config.sampling.cap
    )
    mixture_text = mixture_yaml(config, probabilities)
    mixture_sha = hashlib.sha256(mixture_text.encode() + str(single_adapter).encode()).hexdigest()
    identity = resume_identity(config, probabilities, single_adapter)
    saved = read_checkpoint(checkpoint, identity) if state == "resumable" else None
    if parallel.is_main:
        (out_dir / "mixture.yaml").write_text(mixture_text)
    apply_num_threads(config.train.num_threads, announce=progress)
    torch.manual_seed(config.train.seed)
    trainer = build_trainer(config, data, base_path, tokenizer, probabilities, single_adapter, parallel)
    trainer.budget = budget_record
    if config.train.shared_steps > 0:
        start_shared_phase(trainer, tokenizer)
    if saved is not None:
        load_checkpoint(trainer, saved)
    run_training(trainer, out_dir, identity, progress=progress)
    if os.environ.get(TEST_DIGEST_ENV):
        write_rank_digests(trainer, Path(os.environ[TEST_DIGEST_ENV]))
    # Every rank: keep-if-better's evaluations are collective (DDP sums, FSDP gathers the base's layers).
    recipe = recipe_record(trainer, tokenizer, quiet=not parallel.is_main)
    if parallel.is_main:
        # Rank 0 finishes alone (writes, router training on its own encoder): no forward of trainer.model.
        trainer.parallel = Parallel()
        wall_s = time.perf_counter() - wall_start
        finalize_run(trainer, out_dir, base_path, mixture_sha, single_adapter, wall_s, recipe)
        checkpoint.unlink(missing_ok=True)
    return out_dir


def single_adapter_max_steps(max_steps: int, n_experts: int, budget: str) -> int:
    """Optimizer steps of the single multi-task adapter compared with an experts' run of ``max_steps``.

    ``total``: ``max_steps``, the experts' run's total (the experts share those steps, so both sides take
    the same number of optimizer steps of the same batch size: about equal training tokens).
    ``per-expert``: ``max_steps / n_experts`` rounded (at least 1), the steps one expert gets on average
    (expert i gets about ``max_steps × p_i`` of the sampler): equal steps per adapter, about 1/n the tokens.
    """
    if budget not in SINGLE_ADAPTER_BUDGETS:
        raise TrainError(f"unknown budget {budget!r}: use one of {', '.join(SINGLE_ADAPTER_BUDGETS)}")
    if budget == "total":
        return max_steps
    return max(1, round(max_steps / max(1, n_experts)))


def apply_budget(config: MixtureConfig, single_adapter: bool, budget: str) -> dict[str, Any] | None:
    """Set ``config.train.max_steps`` of a single-adapter run to its budget; the record for metrics.json
    and run.json (None for an experts' run, where a budget other than ``total`` is an error)."""
    if not single_adapter:
        if budget != "total":
            raise TrainError(f"budget {budget!r} applies to --single-adapter runs only: add --single-adapter")
        return None
    experts_max_steps, n_experts = config.train.max_steps, len(config.expert_tasks)
    config.train.max_steps = single_adapter_max_steps(experts_max_steps, n_experts, budget)
    return {
        "budget": budget,
        "max_steps": config.train.max_steps,
        "experts_max_steps": experts_max_steps,
        "n_experts": n_experts,
    }


def drop_recipes_for_single_adapter(config: MixtureConfig, single_adapter: bool) -> None:
    """A single-adapter run is the multi-task baseline: ``train.shared_steps`` / ``keep_if_better`` do not
    apply (it trains one adapter for all its steps); they are set off with a note."""
    tr = config.train
    if single_adapter and tr.uses_recipes():
        print(
            "--single-adapter: train.shared_steps, train.expert_start and train.keep_if_better(_by) do not "
            "apply (one adapter trains all steps); ignored",
            file=sys.stderr,
        )
        tr.recipes_off()


def report_long_rows(data: MixtureData, policy: str, quiet: bool = False) -> None:
    """One line per task whose rows over train.max_length were skipped or truncated (train.long_rows);
    nothing when ``quiet`` (ranks other than 0 of a data-parallel run)."""
    for name, task in data.tasks.items():
        done = {k: v for k, v in task.long_rows.items() if v}
        if done and not quiet:
            what = ", ".join(f"{v} {k}" for k, v in done.items())
            print(
                f"task {name}: rows over train.max_length: {what} (train.long_rows: {policy})",
                file=sys.stderr,
            )


def _load_tokenizer(base_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise TrainError(f"{base_path} has no chat template: use an instruct/chat base model")
    return tokenizer


def write_rank_digests(trainer: Trainer, folder: Path) -> None:
    """Test-only hook (:data:`~moe_adapters.parallel.TEST_DIGEST_ENV`): write ``rank<N>.json`` with the
    global step and, per adapter, its steps and the digest of the weights it would save (its best state)."""
    from peft import get_peft_model_state_dict

    experts = {}
    for name, expert in trainer.experts.items():
        weights = expert.best_state or get_peft_model_state_dict(trainer.model, adapter_name=expert.adapter)
        experts[name] = {"steps": expert.steps, "sha256": adapter_digest(weights)}
    record = {
        "global_step": trainer.global_step,
        "world_size": trainer.parallel.world_size,
        "experts": experts,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{trainer.parallel.rank}.json").write_text(json.dumps(record, indent=2))
