"""Rows: one record of a task's data as the messages a client sends plus the answer to learn; checked
(every problem collected with its location), de-duplicated and split into train / validation / test."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from moe_adapters.config import SplitConfig, TaskConfig
from moe_adapters.templates import TemplateChoice, render_row


class DataValidationError(ValueError):
    """Bad training data; ``problems`` lists every bad row as ``file:line: what is wrong``."""

    def __init__(self, problems: list[str], duplicates: dict[str, int] | None = None) -> None:
        self.problems = problems
        self.duplicates = duplicates or {}
        head = f"{len(problems)} bad row(s) in the training data; fix or remove them and rerun:"
        super().__init__(head + "\n  " + "\n  ".join(problems))


CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Row:
    """One loaded row (README "Module contracts"): the client's messages and the answer to learn.

    ``prompt`` is the last user message (what the router reads), ``response`` the final assistant turn (the
    eval reference); ``history`` holds the messages before that user message (the row's own system
    message, earlier turns) as ``(role, content)`` pairs. Single-turn ``{prompt, response}`` rows have none.
    """

    prompt: str
    response: str
    source: str
    """``file:line`` (JSONL/CSV) or ``file:row N`` (Parquet), for error messages."""
    history: tuple[tuple[str, str], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The task's ``eval_fields`` columns of this row (e.g. ``test_list`` for code), for eval metrics."""
    template: TemplateChoice | None = None
    """For a task with ``templates``: the template drawn for this row and the raw input it wrapped."""

    def client_messages(self) -> list[dict[str, str]]:
        """What a client sends for this row: history + the user message (no task system prompt)."""
        return [{"role": r, "content": c} for r, c in self.history] + [
            {"role": "user", "content": self.prompt}
        ]

    def conversation(self) -> list[dict[str, str]]:
        """The whole conversation: client messages + the assistant answer."""
        return [*self.client_messages(), {"role": "assistant", "content": self.response}]

    def as_dict(self) -> dict[str, Any]:
        """The contract's row shape."""
        return {"prompt": self.prompt, "response": self.response, "messages": self.conversation()}


def record_to_row(task: TaskConfig, record: dict[str, Any], source: str, problems: list[str]) -> Row | None:
    """The :class:`Row` of one record (``prompt_field``/``response_field`` columns, rendered with the task's
    templates, or a chat ``messages_field`` list); None, with every problem in ``problems``, when it is bad."""
    if record.get(task.prompt_field) is None and record.get(task.messages_field) is not None:
        return _messages_row(task, record[task.messages_field], source, problems)
    values: dict[str, str] = {}
    ok = True
    for field_name in (task.prompt_field, task.response_field):
        value = record.get(field_name)
        if field_name not in record or value is None:
            problems.append(f"{source}: missing field {field_name!r} (task {task.name})")
            ok = False
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            problems.append(f"{source}: field {field_name!r} must be text, got {type(value).__name__}")
            ok = False
            continue
        text = value if isinstance(value, str) else str(value)  # CSV readers turn labels like 1 into ints
        if not text.strip():
            problems.append(f"{source}: field {field_name!r} is empty (task {task.name})")
            ok = False
            continue
        values[field_name] = text
    if not ok:
        return None
    prompt, template = render_row(task.templates, task.name, values[task.prompt_field])
    return Row(prompt, values[task.response_field], source, template=template)


def _messages_row(task: TaskConfig, messages: Any, source: str, problems: list[str]) -> Row | None:
    """A chat ``messages`` row: [system] (user, assistant)+ ... ending with the assistant turn to learn."""
    where = f"{source}: field {task.messages_field!r}"
    if not isinstance(messages, list) or not messages:
        problems.append(f"{where} must be a non-empty list of {{role, content}} messages")
        return None
    pairs: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            problems.append(f"{where}[{i}]: role must be one of {list(CHAT_ROLES)}, got {role!r}")
            return None
        if not isinstance(content, str) or not content.strip():
            problems.append(f"{where}[{i}] ({role}): content must be non-empty text")
            return None
        if role == "system" and i > 0:
            problems.append(f"{where}[{i}]: a system message may only come first")
            return None
        pairs.append((role, content))
    if len(pairs) < 2 or pairs[-1][0] != "assistant" or pairs[-2][0] != "user":
        problems.append(f"{where} must end with a user message followed by the assistant answer to learn")
        return None
    turns = [r for r, _ in pairs if r != "system"]
    if any(a == b for a, b in zip(turns, turns[1:], strict=False)):
        problems.append(f"{where}: user and assistant messages must alternate")
        return None
    return Row(pairs[-2][1], pairs[-1][1], source, tuple(pairs[:-2]))


def row_key(row: Row) -> tuple[tuple[tuple[str, str], ...], str, str]:
    """What makes two rows duplicates: the same messages and the same response."""
    return (row.history, row.prompt, row.response)


def deduplicate(rows: list[Row]) -> tuple[list[Row], int]:
    """Drop exact duplicates (same messages and response), keeping the first; return (rows, dropped)."""
    seen: set[tuple[tuple[tuple[str, str], ...], str, str]] = set()
    kept = []
    for row in rows:
        key = row_key(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def split_rows(
    rows: list[Row],
    splits: SplitConfig,
    task_name: str,
    val_rows: list[Row] | None = None,
    test_rows: list[Row] | None = None,
) -> tuple[list[Row], list[Row], list[Row]]:
    """Deterministic train/val/test split (seeded by ``splits.seed`` and the task name).

    Explicit val/test rows replace the corresponding fraction, which then goes to training. A split with
    a positive fraction gets at least one row as long as one row is left for training.
    """
    order = list(range(len(rows)))
    random.Random(f"{splits.seed}:{task_name}").shuffle(order)
    n = len(rows)
    n_val = 0 if val_rows is not None else _share(n, splits.val)
    n_test = 0 if test_rows is not None else _share(n - n_val, splits.test, of_total=n)
    val = [rows[i] for i in order[:n_val]]
    test = [rows[i] for i in order[n_val : n_val + n_test]]
    train = [rows[i] for i in sorted(order[n_val + n_test :])]
    return train, val_rows if val_rows is not None else val, test_rows if test_rows is not None else test


def _share(available: int, fraction: float, of_total: int | None = None) -> int:
    total = available if of_total is None else of_total
    if fraction <= 0 or available < 2:
        return 0
    return min(max(1, round(total * fraction)), available - 1)
