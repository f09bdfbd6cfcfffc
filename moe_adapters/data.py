"""Load, validate, de-duplicate, split and tokenize the tasks of a mixture.

Every row of every file is checked before any training starts; all problems (missing field, empty text,
too long for ``train.max_length`` after chat templating) are reported together with file and line number
in one :class:`DataValidationError`. Prompts go through the base tokenizer's chat template (with the task's
system prompt, if any); labels mask everything except the response tokens and the closing EOS.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moe_adapters.config import MixtureConfig, SplitConfig, TaskConfig
from moe_adapters.templates import TemplateChoice, render_row

IGNORE_INDEX = -100
"""Label value ignored by the loss (prompt and padding positions)."""


class DataValidationError(ValueError):
    """Bad training data; ``problems`` lists every bad row as ``file:line: what is wrong``."""

    def __init__(self, problems: list[str], duplicates: dict[str, int] | None = None) -> None:
        self.problems = problems
        self.duplicates = duplicates or {}
        head = f"{len(problems)} bad row(s) in the training data; fix or remove them and rerun:"
        super().__init__(head + "\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Row:
    """One loaded row: ``{"prompt", "response", "system"}`` (per README "Module contracts") plus where it came from."""

    prompt: str
    response: str
    system: str | None
    source: str
    """``file:line`` (JSONL/CSV) or ``file:row N`` (Parquet), for error messages."""
    template: TemplateChoice | None = None
    """For a task with ``templates``: the template drawn for this row and the raw input it wrapped."""

    def as_dict(self) -> dict[str, str | None]:
        """The contract's row shape."""
        return {"prompt": self.prompt, "response": self.response, "system": self.system}


@dataclass
class Example:
    """A tokenized row: ``labels`` is ``IGNORE_INDEX`` on prompt tokens."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_response_tokens(self) -> int:
        """Tokens that carry loss."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


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
    """Exact duplicates (system, prompt, response) removed, incl. training rows repeated in val/test."""

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


def load_mixture_data(config: MixtureConfig, tokenizer: Any) -> MixtureData:
    """Load every task, validate all rows, drop duplicates, split and tokenize; raise on any bad row."""
    problems: list[str] = []
    tasks: dict[str, TaskData] = {}
    for task in config.tasks:
        main_rows = _load_files(task, task.files, problems)
        val_rows = _load_files(task, [task.val_file], problems) if task.val_file else None
        test_rows = _load_files(task, [task.test_file], problems) if task.test_file else None
        loaded = len(main_rows) + len(val_rows or []) + len(test_rows or [])
        main_rows, dups = deduplicate(main_rows)
        held_out = {_key(r) for r in (val_rows or []) + (test_rows or [])}
        leaked = [r for r in main_rows if _key(r) in held_out]
        main_rows = [r for r in main_rows if _key(r) not in held_out]
        train, val, test = split_rows(main_rows, config.splits, task.name, val_rows, test_rows)
        tasks[task.name] = TaskData(
            task, train, val, test, rows_loaded=loaded, duplicates_dropped=dups + len(leaked)
        )
        if task.unseen_test_file:  # worded by hand already: loaded without the task's templates
            tasks[task.name].unseen = _load_files(
                replace(task, templates=None), [task.unseen_test_file], problems
            )
    for data in tasks.values():
        data.train_examples = tokenize_rows(data.train, tokenizer, config.train.max_length, problems)
        data.val_examples = tokenize_rows(data.val, tokenizer, config.train.max_length, problems)
        tokenize_rows(data.test, tokenizer, config.train.max_length, problems)
        if not data.train and not problems:
            problems.append(f"task {data.name}: no training rows left after de-duplication and splitting")
    if problems:
        raise DataValidationError(problems, {n: t.duplicates_dropped for n, t in tasks.items()})
    return MixtureData(tasks)


def _load_files(task: TaskConfig, files: Sequence[Path | None], problems: list[str]) -> list[Row]:
    rows: list[Row] = []
    for path in files:
        if path is None:
            continue
        try:
            records = read_records(
                path, text_fields=(task.prompt_field, task.response_field), problems=problems
            )
        except Exception as exc:  # noqa: BLE001 - any reader failure is a data problem of this file
            problems.append(
                f"{path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            )
            continue
        for where, record in records:
            row = _to_row(task, record, f"{path}:{where}", problems)
            if row is not None:
                rows.append(row)
    return rows


def read_records(
    path: Path, text_fields: Sequence[str] = (), problems: list[str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSONL/JSON/CSV/Parquet file, each with its location (``line N``, ``record N``, ``row N``).

    JSON is parsed with the standard library, not ``datasets``: pyarrow's JSON reader turns columns of
    date-like strings into timestamps (``"2024-03-05"`` → ``"2024-03-05 00:00:00"`` even with explicit
    string features), which silently corrupts targets. CSV and Parquet go through ``datasets``; CSV
    ``text_fields`` are kept verbatim (no int/float/NA inference: ``"007"`` and ``"NA"`` stay text).
    Unparseable JSON lines are added to ``problems`` (or raised when ``problems`` is None).
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, problems)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else data.get("data", data.get("rows"))
        if not isinstance(records, list):
            raise ValueError("a .json file must hold a list of objects (or {'data': [...]})")
        return [(f"record {i + 1}", r if isinstance(r, dict) else {}) for i, r in enumerate(records)]
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if suffix == ".csv":
            kwargs = {
                "converters": {f: str for f in text_fields},
                "keep_default_na": False,
                "na_values": [""],
            }
            table = datasets.load_dataset("csv", data_files=str(path), split="train", **kwargs)
            return [(f"line {i + 2}", r) for i, r in enumerate(table.to_list())]  # line 1 is the header
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return [(f"row {i + 1}", r) for i, r in enumerate(table.to_list())]
    finally:
        datasets.logging.set_verbosity(verbosity)


def _read_jsonl(path: Path, problems: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if problems is None:
                    raise
                problems.append(f"{path}:line {number}: invalid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                record = {}
            records.append((f"line {number}", record))
    return records


def _to_row(task: TaskConfig, record: dict[str, Any], source: str, problems: list[str]) -> Row | None:
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
    return Row(prompt, values[task.response_field], task.system_prompt, source, template)


def _key(row: Row) -> tuple[str | None, str, str]:
    return (row.system, row.prompt, row.response)


def deduplicate(rows: list[Row]) -> tuple[list[Row], int]:
    """Drop exact duplicates (same system, prompt and response), keeping the first; return (rows, dropped)."""
    seen: set[tuple[str | None, str, str]] = set()
    kept = []
    for row in rows:
        key = _key(row)
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


def tokenize_rows(rows: list[Row], tokenizer: Any, max_length: int, problems: list[str]) -> list[Example]:
    """Chat-template and tokenize rows; rows longer than ``max_length`` are reported in ``problems``."""
    if not rows:
        return []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataValidationError(["the base tokenizer has no eos_token; set one in tokenizer_config.json"])
    prompts = [render_prompt(tokenizer, r.prompt, r.system) for r in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([r.response for r in rows], add_special_tokens=False)["input_ids"]
    examples = []
    for row, p_ids, r_ids in zip(rows, prompt_ids, response_ids, strict=True):
        total = len(p_ids) + len(r_ids) + 1
        if total > max_length:
            problems.append(
                f"{row.source}: {total} tokens after chat templating > train.max_length={max_length} "
                "(shorten the row or raise train.max_length)"
            )
            continue
        examples.append(
            Example(list(p_ids) + list(r_ids) + [eos], [IGNORE_INDEX] * len(p_ids) + list(r_ids) + [eos])
        )
    return examples


def render_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """The chat-templated prompt text ending with the assistant header (what vLLM's chat endpoint builds)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``attention_mask``, ``labels`` (pad → IGNORE_INDEX)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BucketBatcher:
    """Endless, resumable stream of index batches with little padding.

    Each epoch is a seeded permutation cut into pools of ``batch_size * pool_batches`` examples; a pool is
    sorted by length and cut into batches, and the batch order is shuffled — similar lengths share a
    batch without the order becoming predictable. State is ``(epoch, position)``.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, pool_batches: int = 16) -> None:
        if not lengths:
            raise ValueError("BucketBatcher needs at least one example")
        self.lengths = list(lengths)
        self.batch_size = max(1, min(batch_size, len(self.lengths)))
        self.seed = seed
        self.pool_batches = pool_batches
        self.epoch = 0
        self.position = 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        pool = self.batch_size * self.pool_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.position >= len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Resume point."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch_batches(self.epoch)
