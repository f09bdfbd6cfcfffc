"""Tokenization: a row rendered as its expert sees it (task system prompt + the base model's chat
template), with the loss on the assistant turns only, and rows over ``train.max_length`` handled by
``train.long_rows`` (reported, skipped, or truncated from the left of the last user message)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from moe_adapters.data_rows import DataValidationError, Row
from moe_adapters.prompting import PromptSpec, expert_messages, render_chat

IGNORE_INDEX = -100
"""Label value ignored by the loss (prompt and padding positions)."""


@dataclass
class Example:
    """A tokenized row: ``labels`` is ``IGNORE_INDEX`` on prompt tokens."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_response_tokens(self) -> int:
        """Tokens that carry loss."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def tokenize_rows(
    rows: list[Row],
    tokenizer: Any,
    max_length: int,
    problems: list[str],
    *,
    spec: PromptSpec | None = None,
    long_rows: str = "error",
    counts: dict[str, int] | None = None,
) -> tuple[list[Row], list[Example]]:
    """Render rows as their expert sees them (``spec``), tokenize, and handle rows over ``max_length``.

    ``long_rows``: ``error`` (each one goes to ``problems``), ``skip`` (dropped) or ``truncate`` (the last
    user message is cut from the left until the row fits; the answer is never cut, a row whose answer
    alone does not fit is skipped). Returns the kept rows (truncated ones as trained) and their examples;
    ``counts`` receives ``skipped`` / ``truncated``.
    """
    if not rows:
        return [], []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataValidationError(["the base tokenizer has no eos_token; set one in tokenizer_config.json"])
    counts = counts if counts is not None else {}
    kept: list[Row] = []
    examples: list[Example] = []
    for row in rows:
        example = tokenize_conversation(
            tokenizer, expert_messages(row.conversation(), spec), problems, row.source
        )
        if example is None:
            continue
        total = len(example.input_ids)
        if total > max_length and long_rows == "truncate":
            row, example = _truncate(row, example, tokenizer, spec, max_length, problems)
            counts["truncated"] = counts.get("truncated", 0) + (example is not None)
        if example is None or len(example.input_ids) > max_length:
            if long_rows == "error":
                problems.append(
                    f"{row.source}: {total} tokens after chat templating > train.max_length={max_length} "
                    "(shorten the row, raise train.max_length or set train.long_rows: skip | truncate)"
                )
            else:
                counts["skipped"] = counts.get("skipped", 0) + 1
            continue
        kept.append(row)
        examples.append(example)
    return kept, examples


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], problems: list[str], source: str
) -> Example | None:
    """Token ids of a conversation with the loss on every assistant turn (and its closing EOS) only.

    Each assistant turn is preceded by the chat-templated text up to its assistant header, exactly as the
    template renders the conversation so far for generation; a template that rewrites earlier turns
    when later ones are added cannot be trained turn by turn and is reported.
    """
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    ids: list[int] = []
    labels: list[int] = []
    emitted = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:k])
        if not prefix.startswith(emitted):
            problems.append(
                f"{source}: the base model's chat template renders earlier turns differently once later "
                "turns are added; train multi-turn rows as one row per assistant turn"
            )
            return None
        prompt_ids = tokenizer(prefix[len(emitted) :], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
        ids += [*prompt_ids, *answer_ids, eos_id]
        labels += [IGNORE_INDEX] * len(prompt_ids) + [*answer_ids, eos_id]
        emitted = prefix + message["content"] + eos_text
    return Example(ids, labels)


def _truncate(
    row: Row, example: Example, tokenizer: Any, spec: PromptSpec | None, max_length: int, problems: list[str]
) -> tuple[Row, Example | None]:
    """Cut the row's last user message from the left until the row fits (a few re-tokenizations at most);
    ``example`` is the row's untruncated tokenization."""
    prompt_ids = tokenizer(row.prompt, add_special_tokens=False)["input_ids"]
    for _ in range(4):
        over = len(example.input_ids) - max_length
        if over <= 0:
            return row, example
        if over >= len(prompt_ids):
            return row, None  # even an empty user message would not fit: the answer is never cut
        prompt_ids = prompt_ids[over:]
        row = replace(row, prompt=tokenizer.decode(prompt_ids).lstrip() or "…")
        cut = tokenize_conversation(
            tokenizer, expert_messages(row.conversation(), spec), problems, row.source
        )
        if cut is None:
            return row, None
        example = cut
    return row, example if len(example.input_ids) <= max_length else None


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], spec: PromptSpec | None = None) -> str:
    """The chat-templated prompt the expert with ``spec`` sees for a client's ``messages`` (ending with the
    assistant header: what the gateway's vLLM chat endpoint builds for the same request)."""
    return render_chat(tokenizer, expert_messages(messages, spec))
