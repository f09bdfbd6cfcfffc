"""Preference pairs as token ids, rendered exactly as the expert sees a prompt everywhere else.

A pair's prompt goes through :func:`moe_adapters.prompting.expert_messages` with the version's
:class:`~moe_adapters.prompting.PromptSpec` and is tokenized by the same
:func:`moe_adapters.data_tokenize.tokenize_conversation` that supervised training uses, so the prompt ids
DPO trains on are the ids SFT trained on and ``moea eval`` / the gateway send (a test holds them equal).
Each answer is the assistant turn plus the closing EOS, as in SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_adapters.data_tokenize import IGNORE_INDEX, tokenize_conversation
from moe_adapters.preferences import PreferenceFileError, PreferencePair
from moe_adapters.prompting import PromptSpec, expert_messages


@dataclass(frozen=True)
class PairTokens:
    """One preference pair as token ids: the shared prompt and the two answers (each ending with EOS)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""
    """``file:line`` of the pair."""

    def as_row(self) -> dict[str, list[int]]:
        """The pre-tokenized row TRL's DPO collator reads."""
        return {
            "prompt_ids": self.prompt_ids,
            "chosen_ids": self.chosen_ids,
            "rejected_ids": self.rejected_ids,
        }

    @property
    def length(self) -> int:
        """Prompt plus the longer answer, in tokens."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def answer_token_ids(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    answer: str,
    spec: PromptSpec | None,
    problems: list[str],
    source: str = "",
) -> tuple[list[int], list[int]] | None:
    """``(prompt_ids, answer_ids)`` of a client's ``messages`` answered by ``answer``, as SFT tokenizes the
    same conversation; None (with the problem appended) when the chat template cannot be split."""
    conversation = [*expert_messages(messages, spec), {"role": "assistant", "content": answer}]
    example = tokenize_conversation(tokenizer, conversation, problems, source)
    if example is None:
        return None
    # The last assistant turn is the trailing run of labelled positions (its answer and closing EOS).
    split = len(example.labels)
    while split > 0 and example.labels[split - 1] != IGNORE_INDEX:
        split -= 1
    return example.input_ids[:split], example.input_ids[split:]


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer: Any, spec: PromptSpec | None, max_length: int
) -> list[PairTokens]:
    """Every pair as :class:`PairTokens`; raises :class:`PreferenceFileError` listing each pair that cannot
    be rendered or is longer than ``max_length`` (``dpo.max_length``), so nothing trains on a bad file."""
    problems: list[str] = []
    out: list[PairTokens] = []
    for pair in pairs:
        messages = pair.client_messages()
        chosen = answer_token_ids(tokenizer, messages, pair.chosen, spec, problems, pair.source)
        rejected = answer_token_ids(tokenizer, messages, pair.rejected, spec, problems, pair.source)
        if chosen is None or rejected is None:
            continue
        tokens = PairTokens(chosen[0], chosen[1], rejected[1], pair.source)
        if tokens.length > max_length:
            problems.append(
                f"{pair.source}: {tokens.length} tokens (prompt + longer answer after chat templating) > "
                f"dpo.max_length={max_length}; shorten the pair or raise dpo.max_length"
            )
            continue
        out.append(tokens)
    if problems:
        raise PreferenceFileError(problems)
    return out
