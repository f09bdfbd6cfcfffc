"""Preference accuracy: how often an expert prefers the chosen answer of held-back pairs.

Two readings, both from summed answer log-probabilities (answer tokens and the closing EOS, given the
prompt the expert sees):

- ``accuracy``: share of pairs with ``logp(chosen) > logp(rejected)`` (the model's own preference);
- ``reward_accuracy``: share of pairs whose DPO implicit reward margin is positive, i.e.
  ``[logp(chosen) - ref_logp(chosen)] - [logp(rejected) - ref_logp(rejected)] > 0`` against the
  reference (the starting version); the starting version itself scores 0 here by definition.

``accuracy_per_token`` repeats ``accuracy`` on length-normalized log-probabilities (a short canonical
answer has fewer tokens to pay for, which favours it in the summed reading).

And what the expert actually answers (:func:`greedy_win_rate`): each held-back prompt, as the pair's
prompt ids (rendered by :mod:`moe_adapters.dpo_data`, the rule SFT, ``moea eval`` and the gateway share),
is answered greedily; ``greedy_chosen`` / ``greedy_rejected`` are the shares of answers equal to the
chosen / rejected answer. Equality is on decoded text with special tokens dropped and surrounding
whitespace stripped, nothing more: case and punctuation are what a style preference is about.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moe_adapters.dpo_data import PairTokens
from moe_adapters.greedy import answer_text, greedy_answers


@dataclass(frozen=True)
class PairScores:
    """Summed answer log-probabilities of each pair, and the answers' token counts."""

    chosen: list[float]
    rejected: list[float]
    chosen_tokens: list[int]
    rejected_tokens: list[int]


@torch.no_grad()
def answer_logprobs(
    model: Any, sequences: Sequence[tuple[list[int], list[int]]], batch_size: int = 8
) -> list[float]:
    """Summed log-probability of each ``(prompt_ids, answer_ids)``'s answer under ``model`` (eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        answer = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, (prompt, ans) in enumerate(batch):
            n = len(prompt) + len(ans)
            ids[row, :n] = torch.tensor(prompt + ans)
            mask[row, :n] = 1
            answer[row, len(prompt) : n] = True
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        out += (logp * answer[:, 1:].to(device)).sum(dim=1).tolist()
    if was_training:
        model.train()
    return out


def score_pairs(model: Any, pairs: Sequence[PairTokens], batch_size: int = 8) -> PairScores:
    """Chosen and rejected answer log-probabilities of every pair under ``model``."""
    chosen = answer_logprobs(model, [(p.prompt_ids, p.chosen_ids) for p in pairs], batch_size)
    rejected = answer_logprobs(model, [(p.prompt_ids, p.rejected_ids) for p in pairs], batch_size)
    return PairScores(
        chosen, rejected, [len(p.chosen_ids) for p in pairs], [len(p.rejected_ids) for p in pairs]
    )


def preference_accuracy(
    scores: PairScores, reference: PairScores | None = None, beta: float = 0.1
) -> dict[str, Any]:
    """``accuracy``, ``accuracy_per_token``, ``mean_logp_gap`` and the mean chosen / rejected log-probs of
    ``scores``; with the ``reference``'s scores of the same pairs also ``reward_accuracy`` and
    ``mean_reward_margin`` (β × margin, as TRL logs)."""
    n = len(scores.chosen)
    gaps = [c - r for c, r in zip(scores.chosen, scores.rejected, strict=True)]
    per_token = [
        c / max(1, nc) > r / max(1, nr)
        for c, r, nc, nr in zip(
            scores.chosen, scores.rejected, scores.chosen_tokens, scores.rejected_tokens, strict=True
        )
    ]
    report: dict[str, Any] = {
        "pairs": n,
        "accuracy": sum(g > 0 for g in gaps) / n if n else 0.0,
        "accuracy_per_token": sum(per_token) / n if n else 0.0,
        "mean_logp_gap": sum(gaps) / n if n else 0.0,
        "mean_chosen_logp": sum(scores.chosen) / n if n else 0.0,
        "mean_rejected_logp": sum(scores.rejected) / n if n else 0.0,
    }
    if reference is not None:
        ref_gaps = [c - r for c, r in zip(reference.chosen, reference.rejected, strict=True)]
        margins = [g - rg for g, rg in zip(gaps, ref_gaps, strict=True)]
        report["reward_accuracy"] = sum(m > 0 for m in margins) / n if n else 0.0
        report["mean_reward_margin"] = beta * sum(margins) / n if n else 0.0
    return report


GREEDY_EXTRA_TOKENS = 4
"""Tokens generated past the pair's longer answer: enough to show what an off-target answer says."""


def greedy_probe(model: Any, tokenizer: Any, pairs: Sequence[PairTokens]) -> list[str]:
    """``model``'s greedy answer to each pair's prompt ids (:func:`moe_adapters.greedy.greedy_answers`):
    at most the pair's longer answer plus :data:`GREEDY_EXTRA_TOKENS` tokens, stopping at EOS."""
    limits = [max(len(p.chosen_ids), len(p.rejected_ids)) + GREEDY_EXTRA_TOKENS for p in pairs]
    return greedy_answers(model, tokenizer, [p.prompt_ids for p in pairs], limits)


def greedy_win_rate(tokenizer: Any, pairs: Sequence[PairTokens], answers: Sequence[str]) -> dict[str, Any]:
    """``greedy_chosen`` / ``greedy_rejected``: shares of greedy ``answers`` equal to each pair's chosen /
    rejected answer; ``greedy_top_answers``: the three most frequent answers with their counts."""
    n = len(pairs)
    answers = [a.strip() for a in answers]  # as answer_text, for answers that did not come through it
    chosen = sum(a == answer_text(tokenizer, p.chosen_ids) for p, a in zip(pairs, answers, strict=True))
    rejected = sum(a == answer_text(tokenizer, p.rejected_ids) for p, a in zip(pairs, answers, strict=True))
    return {
        "greedy_chosen": chosen / n if n else 0.0,
        "greedy_rejected": rejected / n if n else 0.0,
        "greedy_top_answers": [[text, count] for text, count in Counter(answers).most_common(3)],
    }


def heldout_line(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One printed line: held-back accuracy and greedy win rate before → after."""
    return (
        f"held-back {after['pairs']} pairs: accuracy {before['accuracy']:.2f} → {after['accuracy']:.2f}, "
        f"greedy = chosen {before['greedy_chosen']:.2f} → {after['greedy_chosen']:.2f}, "
        f"= rejected {before['greedy_rejected']:.2f} → {after['greedy_rejected']:.2f}"
    )
