"""The shared warm-up recipe (``train.shared_steps``): every task first trains one ``shared`` adapter,
then each expert starts from its weights; with ``train.keep_if_better`` each task is served by whichever
of the two has the lower validation loss (the decision itself is :mod:`moe_adapters.recipes`)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from moe_adapters.config import SHARED_ADAPTER
from moe_adapters.data import Example, tokenize_rows, training_prompt_spec
from moe_adapters.recipe_metric import val_metric
from moe_adapters.recipes import (
    RECIPE_METRIC,
    format_decisions,
    keep_if_better,
    keep_if_better_by_metric,
    serving_adapters,
)
from moe_adapters.train_state import Trainer, TrainError
from moe_adapters.train_step import evaluate_expert, flush_losses, record_eval


def start_shared_phase(trainer: Trainer, tokenizer: Any) -> None:
    """Begin with the shared warm-up: every task trains the ``shared`` adapter on rows rendered as it is
    served (no task system prompt); :func:`end_shared_phase` hands over to the experts."""
    trainer.shared_examples = shared_view_examples(trainer, tokenizer)
    set_phase(trainer, shared_done=False)


def shared_view_examples(trainer: Trainer, tokenizer: Any) -> dict[str, tuple[list[Example], list[Example]]]:
    """(train, val) examples of each expert task rendered for the shared adapter, row for row the same as
    the expert's (the batchers index both); raise when a row no longer fits ``train.max_length``."""
    tr = trainer.config.train
    out = {}
    for task in trainer.experts[SHARED_ADAPTER].tasks:
        data = trainer.data.tasks[task]
        spec = training_prompt_spec(data.config, single_adapter=True)
        views = []
        for rows, examples in ((data.train, data.train_examples), (data.val, data.val_examples)):
            problems: list[str] = []
            _, shared = tokenize_rows(rows, tokenizer, tr.max_length, problems, spec=spec, long_rows="skip")
            if problems or len(shared) != len(examples):
                raise TrainError(
                    f"task {task}: {len(examples) - len(shared)} rows exceed train.max_length={tr.max_length} "
                    "when rendered for the shared adapter (without the task's system prompt, the chat "
                    "template may add its default one): raise train.max_length"
                )
            views.append(shared)
        out[task] = (views[0], views[1])
    return out


def set_phase(trainer: Trainer, *, shared_done: bool) -> None:
    """Route every task to the shared adapter (warm-up) or to its own expert (after it)."""
    trainer.shared_done = shared_done
    for task in trainer.experts[SHARED_ADAPTER].tasks:
        trainer.expert_of_task[task] = task if shared_done else SHARED_ADAPTER


def shared_phase_due(trainer: Trainer) -> bool:
    """The warm-up is over: ``shared_steps`` taken, or the shared adapter stopped early (patience)."""
    if trainer.shared_done:
        return False
    shared = trainer.experts[SHARED_ADAPTER]
    return trainer.global_step >= trainer.config.train.shared_steps or shared.stopped_early


def end_shared_phase(trainer: Trainer) -> str:
    """Freeze the shared adapter at its best weights and copy them into every expert.

    ``train.expert_start: fresh``: the experts keep their fresh AdamW state and their own warmup + cosine
    schedule (built over the steps after the warm-up). ``continue``: each expert gets a copy of the shared
    adapter's AdamW state and goes on with the run's schedule from the step the warm-up ended
    (:func:`continue_from_shared`). Returns the log line.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    shared = trainer.experts[SHARED_ADAPTER]
    early = shared.stopped_early
    flush_losses(trainer)
    if shared.last_eval_step != shared.steps or shared.best_state is None:
        record_eval(trainer, shared)
        shared.stopped_early = early  # a last eval without improvement does not make the end "early"
    weights = shared.best_state
    if weights is None:  # no validation rows: the last weights
        state = get_peft_model_state_dict(trainer.model, adapter_name=shared.adapter)
        weights = shared.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    for expert in trainer.experts.values():
        set_peft_model_state_dict(trainer.model, weights, adapter_name=expert.adapter)
    if trainer.config.train.expert_start == "continue":
        continue_from_shared(trainer)
    set_phase(trainer, shared_done=True)
    why = "stopped early" if early else "shared_steps reached"
    best = "n/a" if math.isinf(shared.best_val_loss) else f"{shared.best_val_loss:.4f}"
    return (
        f"step {trainer.global_step}: shared warm-up done after {shared.steps} steps ({why}, best val loss "
        f"{best}); {len(trainer.experts) - 1} experts start from the shared weights for the remaining "
        f"{trainer.config.train.max_steps - trainer.global_step} steps"
    )


def continue_from_shared(trainer: Trainer) -> None:
    """``train.expert_start: continue``: every expert starts with a copy of the shared adapter's AdamW
    moments and step count, and its schedule (a :class:`~moe_adapters.train_state.RunSchedule`) goes on
    from the global step the warm-up ended at, over the steps the expert is expected to take after it."""
    shared = trainer.experts[SHARED_ADAPTER]
    left = trainer.config.train.max_steps - trainer.global_step
    shares = trainer.sampler.probabilities
    for name, expert in trainer.experts.items():
        if name == SHARED_ADAPTER:
            continue
        for src, dst in zip(shared.params, expert.params, strict=True):
            state = shared.optimizer.state.get(src)
            if state:
                expert.optimizer.state[dst] = {k: v.clone() for k, v in state.items()}
        schedule = expert.scheduler.lr_lambdas[0]
        schedule.restart_at(trainer.global_step, round(left * sum(shares.get(t, 0.0) for t in expert.tasks)))
        for group in expert.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * schedule(expert.scheduler.last_epoch)


def recipe_record(trainer: Trainer, tokenizer: Any = None, quiet: bool = False) -> dict[str, Any] | None:
    """The shared warm-up's steps and, with ``keep_if_better``, each task's decision (printed unless
    ``quiet``). In a multi-process run every rank calls it (the evaluations are collective; with
    ``keep_if_better_by: val_metric`` every rank also generates the same greedy answers)."""
    if SHARED_ADAPTER not in trainer.experts:
        return None
    tr, shared = trainer.config.train, trainer.experts[SHARED_ADAPTER]
    tasks = list(shared.tasks)
    record: dict[str, Any] = {
        "shared_steps": tr.shared_steps,
        "shared_steps_taken": shared.steps,
        "shared_stopped_early": shared.stopped_early,
        "expert_steps": sum(e.steps for n, e in trainer.experts.items() if n != SHARED_ADAPTER),
        "keep_if_better": tr.keep_if_better,
        "serving": {t: t for t in tasks},
    }
    if not tr.keep_if_better:
        return record
    if shared.best_state is not None:  # frozen at its best since the warm-up ended; make sure
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.model, shared.best_state, adapter_name=shared.adapter)
    shared_losses = {t: evaluate_expert(trainer, shared, [t]) for t in tasks}
    expert_losses = {t: trainer.experts[t].best_val_loss for t in tasks}
    decisions = keep_if_better(expert_losses, shared_losses)
    metric = RECIPE_METRIC
    if tr.keep_if_better_by == "val_metric":
        decisions, metric = _decide_by_metric(trainer, tokenizer, tasks, decisions, quiet), "val_metric"
    record.update({"metric": metric, "decisions": decisions, "serving": serving_adapters(decisions)})
    for line in [] if quiet else format_decisions(decisions):
        print(line, file=sys.stderr)
    return record


def _decide_by_metric(
    trainer: Trainer, tokenizer: Any, tasks: list[str], losses: dict[str, dict[str, Any]], quiet: bool = False
) -> dict[str, dict[str, Any]]:
    """Keep-if-better by each task's metric on greedy answers to its validation rows: the shared adapter
    (frozen at its best) and each expert at its best weights, the ones the run saves. One progress line per
    adapter and task (generation is the slow part) unless ``quiet``."""
    from peft import set_peft_model_state_dict

    def scored(name: str, task: str) -> dict[str, Any] | None:
        start = time.monotonic()
        result = val_metric(trainer, tokenizer, trainer.experts[name], task)
        if not quiet and result is not None:
            print(
                f"keep-if-better by val metric: {name} on {task}: {result['metric']} "
                f"{result['score']:.3f} on {result['n']} val rows ({time.monotonic() - start:.0f} s)",
                file=sys.stderr,
            )
        return result

    shared_scores = {t: scored(SHARED_ADAPTER, t) for t in tasks}
    expert_scores = {}
    for task in tasks:
        expert = trainer.experts[task]
        if expert.best_state is not None:
            set_peft_model_state_dict(trainer.model, expert.best_state, adapter_name=expert.adapter)
        expert_scores[task] = scored(task, task)
    return keep_if_better_by_metric(expert_scores, shared_scores, losses)
