"""Greedy answers from a transformers model: the one generation loop for DPO's held-out probe
(:mod:`moe_adapters.dpo_eval`) and keep-if-better by the task's metric (:mod:`moe_adapters.recipe_metric`).

One prompt at a time (no padding, so each prompt is exactly the given ids), greedy, stopping at EOS; the
answer is the generated ids decoded without special tokens and stripped (:func:`answer_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def answer_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Generated (or reference) ids as the answer text: special tokens dropped, stripped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]
) -> list[str]:
    """``model``'s greedy answer (:func:`answer_text`) to each prompt's ids, at most the matching
    ``max_new_tokens`` tokens each; the model is left in the train/eval mode it was in."""
    from transformers import GenerationConfig

    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} max_new_tokens")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for prompt, limit in zip(prompts, max_new_tokens, strict=True):
            settings = GenerationConfig(
                do_sample=False,
                max_new_tokens=int(limit),
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
                use_cache=True,
            )
            ids = torch.tensor([list(prompt)], device=device)
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=settings
            )
            out.append(answer_text(tokenizer, generated[0, ids.shape[1] :].tolist()))
    finally:
        if was_training:
            model.train()
    return out
