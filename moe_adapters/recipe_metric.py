"""Keep-if-better by the task's own metric (``train.keep_if_better_by: val_metric``): each adapter answers
the task's validation rows greedily, as it is served, and the answers are scored with the metric
``moea eval`` reports for the task's kind (:func:`moe_adapters.metrics.score_task`).

Why: the validation loss (teacher-forced cross-entropy) can fall while greedy answers get worse. On five
real tasks, experts continued from a shared warm-up had a lower val loss than the shared adapter on every
task and a lower test score on every task (README "Evaluation").

Parity with serving: the prompt is the client's messages with the adapter's system prompt rule
(:func:`moe_adapters.data_tokenize.render_prompt`, the chat template vLLM's chat endpoint applies), one
prompt at a time (no padding), greedy, stopping at EOS, at most ``moea eval``'s default
``max_new_tokens``. Generation here is transformers', not vLLM's: the two can differ on near-ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moe_adapters.data import training_prompt_spec
from moe_adapters.data_rows import Row
from moe_adapters.data_tokenize import render_prompt
from moe_adapters.eval_types import EvalSettings
from moe_adapters.greedy import greedy_answers
from moe_adapters.metrics import score_task
from moe_adapters.train_state import ExpertState, Trainer

VAL_METRIC_NEW_TOKENS = EvalSettings().max_new_tokens
"""Greedy tokens per answer: ``moea eval``'s default (``EvalSettings.max_new_tokens``)."""


def val_rows(trainer: Trainer, task: str) -> list[Row]:
    """The task's validation rows the val loss reads too (at most ``eval_batches * batch_size``)."""
    tr = trainer.config.train
    return list(trainer.data.tasks[task].val[: tr.eval_batches * tr.batch_size])


def val_metric(trainer: Trainer, tokenizer: Any, expert: ExpertState, task: str) -> dict[str, Any] | None:
    """``{metric, score, n}`` of ``expert``'s greedy answers to ``task``'s validation rows (its current
    weights); None without validation rows."""
    rows = val_rows(trainer, task)
    if not rows:
        return None
    config = trainer.data.tasks[task].config
    spec = training_prompt_spec(config, single_adapter=len(expert.tasks) > 1)
    prompts = [render_prompt(tokenizer, row.client_messages(), spec) for row in rows]
    answers = greedy_texts(trainer, tokenizer, expert.adapter, prompts)
    scored = score_task(config.kind, answers, [r.response for r in rows], None, [r.extra for r in rows])
    return {"metric": scored["metric"], "score": float(scored["score"]), "n": len(rows)}


def greedy_texts(trainer: Trainer, tokenizer: Any, adapter: str, prompts: Sequence[str]) -> list[str]:
    """Greedy answers of PEFT adapter ``adapter`` to chat-templated ``prompts``
    (:func:`moe_adapters.greedy.greedy_answers`, at most :data:`VAL_METRIC_NEW_TOKENS` tokens each)."""
    if trainer.active_adapter != adapter:  # as the training step activates one (train_step._activate)
        trainer.model.base_model.set_adapter(adapter)
        trainer.active_adapter = adapter
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return greedy_answers(trainer.model, tokenizer, ids, [VAL_METRIC_NEW_TOKENS] * len(ids))
