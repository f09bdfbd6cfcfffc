"""Load, validate, de-duplicate, split and tokenize the tasks of a mixture.

A row is either ``{prompt, response}`` columns or a chat ``messages`` list (``[{"role", "content"}, ...]``,
multi-turn included, ending with the assistant turn to learn). Every row of every file is checked before
any training starts; all problems (missing field, bad message list, empty text, too long for
``train.max_length`` after chat templating) are reported together with file and line number in one
:class:`~moe_adapters.data_rows.DataValidationError`. What the expert sees is decided by
:func:`moe_adapters.prompting.expert_messages` (the task's system prompt and ``prompt_policy``, the same rule
the gateway applies) and the base tokenizer's chat template; labels mask everything except the assistant
turns and their closing EOS.

The steps live in their own modules: :mod:`~moe_adapters.data_sources` (reading files and datasets),
:mod:`~moe_adapters.data_rows` (records to rows, de-duplication, splits),
:mod:`~moe_adapters.data_tokenize` (chat templating, labels, long rows) and
:mod:`~moe_adapters.data_batches` (padding, batch order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moe_adapters.config import DatasetSource, MixtureConfig, TaskConfig
from moe_adapters.data_rows import DataValidationError, Row, deduplicate, record_to_row, row_key, split_rows
from moe_adapters.data_sources import Records, read_source
from moe_adapters.data_tokenize import Example, tokenize_rows
from moe_adapters.prompting import PromptSpec


@dataclass
class TaskData:
    """One task after loading: rows per split and their tokenized examples."""

    config: TaskConfig
    train: list[Row]
    val: list[Row]
    test: list[Row]
    train_examples: list[Example] = field(default_factory=list)
    val_examples: list[Example] = field(default_factory=list)
    unseen: list[Row] = field(default_factory=list)
    """Rows of ``unseen_test_file``, as worded there (never templated, never trained on; eval only)."""
    rows_loaded: int = 0
    """Rows read from all files of the task (before de-duplication)."""
    duplicates_dropped: int = 0
    """Exact duplicates (messages and response) removed, incl. training rows repeated in val/test."""
    long_rows: dict[str, int] = field(default_factory=dict)
    """Train/val rows over ``train.max_length`` handled by ``train.long_rows``: ``skipped``, ``truncated``."""

    @property
    def name(self) -> str:
        """Task name."""
        return self.config.name


@dataclass
class MixtureData:
    """All tasks of a mixture, ready for training."""

    tasks: dict[str, TaskData]

    def sizes(self, *, experts_only: bool = True) -> dict[str, int]:
        """Training rows per task (the sampler's n_i)."""
        return {n: len(t.train) for n, t in self.tasks.items() if not (experts_only and t.config.replay)}

    @property
    def duplicates(self) -> dict[str, int]:
        """Duplicates dropped per task."""
        return {n: t.duplicates_dropped for n, t in self.tasks.items()}


def load_mixture_data(config: MixtureConfig, tokenizer: Any, *, single_adapter: bool = False) -> MixtureData:
    """Load every task, validate all rows, drop duplicates, split and tokenize; raise on any bad row.

    Each task's rows are rendered the way its expert is served (:func:`training_prompt_spec`).
    """
    problems: list[str] = []
    tasks: dict[str, TaskData] = {}
    for task in config.tasks:
        main_rows = _load_files(task, [*task.files, task.dataset], problems)
        val_rows = _load_files(task, [task.val_file], problems, "validation") if task.val_file else None
        test_rows = _load_files(task, [task.test_file], problems, "test") if task.test_file else None
        loaded = len(main_rows) + len(val_rows or []) + len(test_rows or [])
        main_rows, dups = deduplicate(main_rows)
        held_out = {row_key(r) for r in (val_rows or []) + (test_rows or [])}
        leaked = [r for r in main_rows if row_key(r) in held_out]
        main_rows = [r for r in main_rows if row_key(r) not in held_out]
        train, val, test = split_rows(main_rows, config.splits, task.name, val_rows, test_rows)
        tasks[task.name] = TaskData(
            task, train, val, test, rows_loaded=loaded, duplicates_dropped=dups + len(leaked)
        )
        if task.unseen_test_file:  # worded by hand already: loaded without the task's templates
            tasks[task.name].unseen = _load_files(
                replace(task, templates=None), [task.unseen_test_file], problems, "test"
            )
    max_length, policy = config.train.max_length, config.train.long_rows
    for data in tasks.values():
        spec = training_prompt_spec(data.config, single_adapter)
        counts = data.long_rows = {"skipped": 0, "truncated": 0}
        data.train, data.train_examples = tokenize_rows(
            data.train, tokenizer, max_length, problems, spec=spec, long_rows=policy, counts=counts
        )
        data.val, data.val_examples = tokenize_rows(
            data.val, tokenizer, max_length, problems, spec=spec, long_rows=policy, counts=counts
        )
        if policy == "error":  # test rows are sent to eval as a client would send them, never cut
            tokenize_rows(data.test, tokenizer, max_length, problems, spec=spec)
        if not data.train and not problems:
            problems.append(f"task {data.name}: no training rows left after de-duplication and splitting")
    if problems:
        raise DataValidationError(problems, {n: t.duplicates_dropped for n, t in tasks.items()})
    return MixtureData(tasks)


def _load_files(
    task: TaskConfig,
    sources: Sequence[Path | DatasetSource | None],
    problems: list[str],
    split: str = "train",
) -> list[Row]:
    """Rows of a task's data files, save_to_disk folders (``split`` of a DatasetDict) and ``dataset:``."""
    rows: list[Row] = []
    fields = _text_fields(task)
    for source in sources:
        if source is None:
            continue
        read = read_source(source, fields, problems, split)
        if read is None:
            continue
        label, records = read
        has_messages = any(task.messages_field in record for _, record in records)  # row by row below
        if not has_messages and not _has_columns(label, records, fields, task.name, problems):
            continue
        for where, record in records:
            row = record_to_row(task, record, where, problems)
            if row is not None:
                rows.append(_with_eval_fields(row, task, record))
    return rows


def _with_eval_fields(row: Row, task: TaskConfig, record: dict[str, Any]) -> Row:
    """The row with the record's ``eval_fields`` columns as ``extra`` (absent columns are left out)."""
    extra = {name: record[name] for name in task.eval_fields if record.get(name) is not None}
    return replace(row, extra=extra) if extra else row


def _text_fields(task: TaskConfig) -> dict[str, str]:
    """Columns every source of ``task`` must have unless it holds ``messages_field`` rows (kept verbatim in
    CSV) → the setting that names them."""
    return {task.prompt_field: "prompt_field", task.response_field: "response_field"}


def _has_columns(
    label: str, records: Records, fields: Mapping[str, str], task_name: str, problems: list[str]
) -> bool:
    """Report each needed column that no record has (once, not once per row); True when all are there."""
    missing = [f for f in fields if records and not any(f in record for _, record in records)]
    for name in missing:
        columns = sorted({key for _, record in records[:100] for key in record})
        problems.append(
            f"{label}: no column {name!r} (task {task_name}; columns: {', '.join(columns) or 'none'});"
            f" set {fields[name]} to the right one"
        )
    return not missing


def training_prompt_spec(task: TaskConfig, single_adapter: bool = False) -> PromptSpec | None:
    """The spec a task's rows are trained with: the task's own, or none for the single multi-task adapter
    (served under one name without a router, it gets no task's system prompt at serving time either)."""
    return None if single_adapter and not task.replay else task.prompt_spec()
