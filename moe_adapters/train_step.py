"""One optimizer step of a sampled task's adapter, and an adapter's validation loss with early stopping.

Speed on a small model: the LM head and the loss run only on response positions (prompt logits are never
computed), and losses are read back from the device only when :func:`flush_losses` is called.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from moe_adapters.config import SHARED_ADAPTER
from moe_adapters.data import Example
from moe_adapters.data_batches import collate
from moe_adapters.data_tokenize import IGNORE_INDEX
from moe_adapters.fsdp import equal_forward_counts
from moe_adapters.train_state import ExpertState, Trainer


def response_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, number of target tokens): the LM head runs on response positions only."""
    causal_lm = model.base_model.model  # the transformers model with LoRA layers injected in place
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
    count = keep.sum()
    return F.cross_entropy(logits.float(), targets[keep]), count


def _activate(trainer: Trainer, expert: ExpertState) -> None:
    if trainer.active_adapter != expert.adapter:
        trainer.model.base_model.set_adapter(expert.adapter)
        trainer.active_adapter = expert.adapter


def task_examples(trainer: Trainer, task: str, expert: ExpertState) -> tuple[list[Example], list[Example]]:
    """(train, val) examples of ``task`` as ``expert`` sees them (the shared adapter: its own rendering)."""
    if expert.name == SHARED_ADAPTER and trainer.shared_examples is not None:
        return trainer.shared_examples[task]
    data = trainer.data.tasks[task]
    return data.train_examples, data.val_examples


def rank_batches(trainer: Trainer, task: str, expert: ExpertState) -> list[list[Example]]:
    """The step's batch of every rank: each rank draws ``world_size`` batches from the task's (and the
    replay) batcher, seeded alike on all ranks, and trains on the one at its rank (one process: one batch)."""
    source = task_examples(trainer, task, expert)[0]
    batches = []
    for _ in range(trainer.parallel.world_size):
        examples = [source[i] for i in next(trainer.batchers[task])]
        if trainer.replay_batcher is not None:
            examples += [trainer.replay_examples[i] for i in next(trainer.replay_batcher)]
        batches.append(examples)
    return batches


def train_step(trainer: Trainer) -> tuple[str, int]:
    """One optimizer step on the expert of a sampled task; returns (task, tokens in the batch of all ranks).

    Every rank samples the same task (same sampler seed); gradients are averaged across ranks
    (:meth:`~moe_adapters.parallel.Parallel.average_gradients`) before clipping and the optimizer step."""
    task = trainer.sampler.sample()
    expert = trainer.experts[trainer.expert_of_task[task]]
    batches = rank_batches(trainer, task, expert)
    examples = batches[trainer.parallel.rank]
    tokens = sum(len(e.input_ids) for batch in batches for e in batch)
    batch = {k: v.to(trainer.device, non_blocking=True) for k, v in collate(examples, trainer.pad_id).items()}
    _activate(trainer, expert)
    start = time.perf_counter()
    loss, _ = response_loss(trainer.model, batch)
    loss.backward()
    loss = trainer.parallel.average_gradients(expert.params, loss)
    if trainer.config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(expert.params, trainer.config.train.grad_clip, foreach=True)
    expert.optimizer.step()
    expert.scheduler.step()
    expert.optimizer.zero_grad(set_to_none=True)
    expert.step_time_s += time.perf_counter() - start
    expert.steps += 1
    expert.tokens += tokens
    trainer.global_step += 1
    trainer.pending.append((trainer.global_step, expert.name, loss.detach()))
    return task, tokens


def flush_losses(trainer: Trainer) -> float | None:
    """Read pending losses back from the device (one sync) into the curves; return the latest loss."""
    if not trainer.pending:
        return None
    values = torch.stack([loss for _, _, loss in trainer.pending]).float().tolist()
    for (step, name, _), value in zip(trainer.pending, values, strict=True):
        trainer.experts[name].train_curve.append((step, value))
    trainer.pending.clear()
    return values[-1]


@torch.no_grad()
def evaluate_expert(trainer: Trainer, expert: ExpertState, tasks: list[str] | None = None) -> float:
    """Token-weighted validation loss of ``expert`` on (at most ``eval_batches`` batches of) the val rows of
    ``tasks`` (default: its own tasks). In a data-parallel run each rank evaluates every ``world_size``-th
    row and the sums are all-reduced, so every rank gets the same number (and the same early stopping)."""
    bs = trainer.config.train.batch_size
    examples = [ex for t in tasks or expert.tasks for ex in task_examples(trainer, t, expert)[1]]
    if not examples:
        return math.nan
    examples = sorted(
        examples[: bs * max(1, trainer.config.train.eval_batches)], key=lambda e: len(e.input_ids)
    )
    mine = examples[trainer.parallel.rank :: trainer.parallel.world_size]
    batches = [mine[i : i + bs] for i in range(0, len(mine), bs)]
    forwards = len(batches)
    if trainer.parallel.fsdp is not None:  # sharded layers gather in every forward: all ranks run as many
        forwards = equal_forward_counts(len(batches), trainer.parallel)
    _activate(trainer, expert)
    trainer.model.eval()
    total = torch.zeros((), device=trainer.device)
    count = torch.zeros((), device=trainer.device)
    for i in range(forwards):
        counted = i < len(batches)
        rows = batches[i] if counted else examples[:1]  # an extra forward, left out of the sums
        batch = {k: v.to(trainer.device) for k, v in collate(rows, trainer.pad_id).items()}
        loss, n = response_loss(trainer.model, batch)
        if counted:
            total += loss * n
            count += n
    trainer.model.train()
    trainer.parallel.sum_(total, count)
    return float(total / count)


def record_eval(trainer: Trainer, expert: ExpertState) -> None:
    """Evaluate, keep best weights, and stop the expert after ``patience`` evals without improvement."""
    from peft import get_peft_model_state_dict

    val = evaluate_expert(trainer, expert)
    expert.last_eval_step = expert.steps
    if math.isnan(val):
        return
    expert.val_curve.append((trainer.global_step, val))
    if val < expert.best_val_loss - 1e-6:
        expert.best_val_loss = val
        expert.evals_without_improvement = 0
        state = get_peft_model_state_dict(trainer.model, adapter_name=expert.adapter)
        expert.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        return
    expert.evals_without_improvement += 1
    patience = trainer.config.train.patience
    if patience and expert.evals_without_improvement >= patience and not expert.stopped_early:
        expert.stopped_early = True
        if expert.name == SHARED_ADAPTER:
            return  # ends the warm-up early (shared_phase_due); the tasks' experts still train
        for task in expert.tasks:
            trainer.sampler.remove(task)
