"""Reading data sources into plain records: JSONL/JSON/CSV/Parquet files, ``datasets`` ``save_to_disk``
folders and ``dataset:`` sources (hub ids, packaged builders, local folders), each record with its location
(``line N``, ``record N``, ``row N``) for error messages. Text columns are kept verbatim."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moe_adapters.config import DatasetSource
from moe_adapters.config_paths import saved_dataset_kind

Records = list[tuple[str, dict[str, Any]]]
"""Rows of one source as ``(location, record)``; a record is a plain dict of all columns."""


class SourceError(ValueError):
    """A data source cannot be read; the message says why in one line (and what to do)."""


def read_source(
    source: Path | DatasetSource, fields: Sequence[str], problems: list[str], split: str
) -> tuple[str, Records] | None:
    """``(label, records with full locations)`` of a data file/folder or ``dataset:`` source; None (and a
    problem in ``problems``) when the source cannot be read."""
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
