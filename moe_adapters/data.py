"""Load, validate, de-duplicate, split and tokenize the tasks of a mixture.

A row is either ``{prompt, response}`` columns or a chat ``messages`` list (``[{"role", "content"}, ...]``,
multi-turn included, ending with the assistant turn to learn). Every row of every file is checked before
any training starts; all problems (missing field, bad message list, empty text, too long for
``train.max_length`` after chat templating) are reported together with file and line number in one
:class:`DataValidationError`. What the expert sees is decided by :func:`moe_adapters.prompting.expert_messages`
(the task's system prompt and ``prompt_policy``, the same rule the gateway applies) and the base tokenizer's
chat template; labels mask everything except the assistant turns and their closing EOS.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moe_adapters.config import DatasetSource, MixtureConfig, SplitConfig, TaskConfig, saved_dataset_kind
from moe_adapters.prompting import PromptSpec, expert_messages, render_chat
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
        held_out = {_key(r) for r in (val_rows or []) + (test_rows or [])}
        leaked = [r for r in main_rows if _key(r) in held_out]
        main_rows = [r for r in main_rows if _key(r) not in held_out]
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


Records = list[tuple[str, dict[str, Any]]]
"""Rows of one source as ``(location, record)``; a record is a plain dict of all columns."""


class SourceError(ValueError):
    """A data source cannot be read; the message says why in one line (and what to do)."""


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
        read = _read_source(source, fields, problems, split)
        if read is None:
            continue
        label, records = read
        has_messages = any(task.messages_field in record for _, record in records)  # row by row below
        if not has_messages and not _has_columns(label, records, fields, task.name, problems):
            continue
        for where, record in records:
            row = _to_row(task, record, where, problems)
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


def _read_source(
    source: Path | DatasetSource, fields: Sequence[str], problems: list[str], split: str
) -> tuple[str, Records] | None:
    """``(label, records with full locations)``; None (and a problem) when the source cannot be read."""
    is_dataset = isinstance(source, DatasetSource)
    label = source.label if isinstance(source, DatasetSource) else str(source)
    try:
        if isinstance(source, DatasetSource):
            records = read_dataset(source, text_fields=list(fields), problems=problems)
        else:
            records = read_records(source, text_fields=list(fields), problems=problems, split=split)
    except SourceError as exc:
        problems.append(f"{label}: {exc}")
        return None
    except Exception as exc:  # noqa: BLE001 - any reader failure is a data problem of this source
        why = (
            describe_dataset_error(exc)
            if is_dataset
            else f"cannot be read ({type(exc).__name__}: {_first_line(exc)})"
        )
        problems.append(f"{label}: {why}")
        return None
    separator = " " if is_dataset else ":"  # dataset:path[split] row N, file:line N
    return label, [(f"{label}{separator}{where}", record) for where, record in records]


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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def describe_dataset_error(exc: BaseException) -> str:
    """One line for a failed ``dataset:`` load: what went wrong and, for the hub, what to do."""
    first = _first_line(exc)
    if _hub_unreachable(exc):
        import datasets

        if datasets.config.HF_HUB_OFFLINE:
            return (
                f"not in the local datasets cache and the Hugging Face Hub is switched off here ({first});"
                " load it where the hub is reachable, .save_to_disk(DIR), copy DIR here and list it under files:"
            )
        return (
            f"cannot reach the Hugging Face Hub ({first}); load it where the hub is reachable,"
            " .save_to_disk(DIR), copy DIR here and list it under files: - or set HF_DATASETS_OFFLINE=1"
            " to use a copy already in the local datasets cache"
        )
    if type(exc).__name__ == "DatasetNotFoundError" or isinstance(exc, FileNotFoundError):
        return (
            f"not found ({first}); dataset.path is a hub id (owner/name), a builder such as parquet"
            " with data_files, or a folder or file relative to the mixture YAML"
        )
    return f"cannot be read ({type(exc).__name__}: {first})"


def _hub_unreachable(exc: BaseException) -> bool:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    offline_errors = {"ConnectError", "ConnectTimeout", "OfflineModeIsEnabled", "LocalEntryNotFoundError"}
    return any(
        isinstance(e, ConnectionError | TimeoutError) or type(e).__name__ in offline_errors for e in chain
    )


def read_records(
    path: Path,
    text_fields: Sequence[str] = (),
    problems: list[str] | None = None,
    *,
    split: str = "train",
) -> Records:
    """Rows of a JSONL/JSON/CSV/Parquet file or a ``save_to_disk`` folder, each with its location
    (``line N``, ``record N``, ``row N``); a ``DatasetDict`` folder gives its ``split``.

    JSON is parsed with the standard library, not ``datasets``: pyarrow's JSON reader turns columns of
    date-like strings into timestamps (``"2024-03-05"`` → ``"2024-03-05 00:00:00"`` even with explicit
    string features), which silently corrupts targets. CSV and Parquet go through ``datasets``; CSV
    ``text_fields`` are kept verbatim (no int/float/NA inference: ``"007"`` and ``"NA"`` stay text).
    A ``.json`` file that is not one JSON document is read as JSON lines (as ``datasets`` does).
    Unparseable JSON lines are added to ``problems`` (or raised when ``problems`` is None).
    """
    if path.is_dir():
        return read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, problems)
    if suffix == ".json":
        return _read_json(path, problems)
    import datasets

    with _quiet_datasets():
        if suffix == ".csv":
            options = _csv_text_options(text_fields)
            table = datasets.load_dataset("csv", data_files=str(path), split="train", **options)
            return [(f"line {i + 2}", r) for i, r in enumerate(table.to_list())]  # line 1 is the header
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    return _numbered(table.to_list())


def read_saved_dataset(folder: Path, split: str = "train") -> Records:
    """Rows of a ``Dataset.save_to_disk`` folder, or of ``split`` of a ``DatasetDict.save_to_disk`` folder."""
    import datasets

    with _quiet_datasets():
        loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SourceError(
                f"a DatasetDict without a {split!r} split (splits: {', '.join(loaded) or 'none'});"
                f" point at one split's folder instead, e.g. {folder / next(iter(loaded), 'SPLIT')}"
            )
        loaded = loaded[split]
    return _numbered(loaded.to_list())


def read_dataset(
    source: DatasetSource, text_fields: Sequence[str] = (), problems: list[str] | None = None
) -> Records:
    """Rows of ``source.split`` as ``datasets.load_dataset`` would load them, each located as ``row N``.

    Local JSON/JSONL/CSV data files are read by :func:`read_records` instead, so that text stays verbatim
    (pyarrow's JSON reader rewrites date-like strings); a ``save_to_disk`` folder is read with
    ``load_from_disk``. Everything else (hub ids, Parquet, Arrow, other builders) goes through the
    ``datasets`` builder.
    """
    import datasets

    path = Path(source.path)
    if path.is_absolute() and saved_dataset_kind(path):
        with _quiet_datasets():
            loaded = datasets.load_from_disk(str(path))
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return _numbered(select_split(source.split, {n: ds.to_list for n, ds in splits.items()}))
    builder_path, data_files = source.path, source.data_files
    if path.is_absolute() and path.is_file():  # one local data file: its packaged builder
        builder_path, data_files = _BUILDER_OF_SUFFIX.get(path.suffix.lower(), source.path), str(path)
    with _quiet_datasets():
        builder = datasets.load_dataset_builder(
            builder_path, source.name, data_files=data_files, revision=source.revision
        )
        local = _local_text_files(builder)
        if local is not None:
            readers = {n: _file_reader(files, text_fields, problems) for n, files in local.items()}
            return _numbered(select_split(source.split, readers))
        if builder.config.data_files:  # an unknown split fails here, before anything is downloaded
            select_split(source.split, dict.fromkeys(map(str, builder.config.data_files), list))
        if builder.name == "csv":  # remote CSV: keep text columns verbatim as read_records does
            builder = datasets.load_dataset_builder(
                builder_path,
                source.name,
                data_files=data_files,
                revision=source.revision,
                **_csv_text_options(text_fields),
            )
        builder.download_and_prepare()
        table = builder.as_dataset(split=source.split)
    if builder.name == "json":
        _check_text_columns(table, text_fields)
    return _numbered(table.to_list())


_BUILDER_OF_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_VERBATIM_SUFFIXES = (".jsonl", ".json", ".csv")


def _csv_text_options(text_fields: Sequence[str]) -> dict[str, Any]:
    """pandas CSV options that keep ``text_fields`` as written (``"007"``, ``"NA"``) and only "" as missing."""
    return {"converters": {f: str for f in text_fields}, "keep_default_na": False, "na_values": [""]}


def _local_text_files(builder: Any) -> dict[str, list[Path]] | None:
    """Split → local JSON/CSV files of a ``json``/``csv`` builder; None when anything is remote or other."""
    data_files = builder.config.data_files
    if builder.name not in ("json", "csv") or not data_files:
        return None
    splits = {str(name): [Path(str(f)) for f in files] for name, files in data_files.items()}
    every_file = [f for files in splits.values() for f in files]
    if all(f.is_absolute() and f.is_file() and f.suffix.lower() in _VERBATIM_SUFFIXES for f in every_file):
        return splits
    return None


def _file_reader(
    files: list[Path], text_fields: Sequence[str], problems: list[str] | None
) -> Callable[[], list[dict[str, Any]]]:
    def read() -> list[dict[str, Any]]:
        return [r for f in files for _, r in read_records(f, text_fields=text_fields, problems=problems)]

    return read


def select_split(
    spec: str, splits: Mapping[str, Callable[[], Sequence[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    """Rows of a split spec (``train``, ``train[:100]``, ``train[:10%]+test``) over lazily read splits."""
    import datasets

    names = [part.split("[", 1)[0].strip() for part in spec.split("+")]
    unknown = [n for n in names if n not in splits]
    if unknown:
        raise SourceError(f"unknown split {unknown[0]!r} (splits: {', '.join(splits) or 'none'})")
    rows = {name: splits[name]() for name in dict.fromkeys(names)}
    if spec in rows:
        return list(rows[spec])
    try:
        instructions = datasets.ReadInstruction.from_spec(spec).to_absolute(
            {n: len(r) for n, r in rows.items()}
        )
    except (ValueError, AssertionError) as exc:
        raise SourceError(f"bad split {spec!r}: {exc}") from exc
    return [row for i in instructions for row in rows[i.splitname][i.from_ : i.to]]


def _check_text_columns(table: Any, text_fields: Sequence[str]) -> None:
    import pyarrow as pa

    for name in text_fields:
        if name in table.column_names and pa.types.is_temporal(table.data.schema.field(name).type):
            raise SourceError(
                f"column {name!r} was read as {table.data.schema.field(name).type}: pyarrow's JSON reader"
                " turns date-like text into timestamps, which changes it; download the data files and list"
                " them under files: (read verbatim there)"
            )


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars, and warnings only as errors (hub retries, cache notes), while ``datasets`` reads."""
    import datasets
    import huggingface_hub

    verbosity, hub_verbosity = datasets.logging.get_verbosity(), huggingface_hub.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity_error()
    huggingface_hub.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        huggingface_hub.logging.set_verbosity(hub_verbosity)
        if bars:
            datasets.enable_progress_bars()


def _numbered(rows: Sequence[dict[str, Any]]) -> Records:
    return [(f"row {i + 1}", row) for i, row in enumerate(rows)]


def _read_json(path: Path, problems: list[str] | None) -> Records:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":  # anything but several documents (JSON lines) is broken JSON
            raise
        return _read_jsonl(path, problems)
    records = data.get("data", data.get("rows")) if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise SourceError("a .json file must hold a list of objects (or {'data': [...]}) or JSON lines")
    return [(f"record {i + 1}", r if isinstance(r, dict) else {}) for i, r in enumerate(records)]


def _read_jsonl(path: Path, problems: list[str] | None) -> Records:
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


def training_prompt_spec(task: TaskConfig, single_adapter: bool = False) -> PromptSpec | None:
    """The spec a task's rows are trained with: the task's own, or none for the single multi-task adapter
    (served under one name without a router, it gets no task's system prompt at serving time either)."""
    return None if single_adapter and not task.replay else task.prompt_spec()


def _to_row(task: TaskConfig, record: dict[str, Any], source: str, problems: list[str]) -> Row | None:
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


def _key(row: Row) -> tuple[tuple[tuple[str, str], ...], str, str]:
    return (row.history, row.prompt, row.response)


def deduplicate(rows: list[Row]) -> tuple[list[Row], int]:
    """Drop exact duplicates (same messages and response), keeping the first; return (rows, dropped)."""
    seen: set[tuple[tuple[tuple[str, str], ...], str, str]] = set()
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
