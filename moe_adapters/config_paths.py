"""Where a mixture's files are: paths relative to the mixture YAML made absolute, local paths told apart
from hub ids and builder names, and ``datasets`` ``save_to_disk`` folders recognised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_adapters.config import DatasetSource, MixtureConfig

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SAVED_DATASET_MARKERS = {
    "dataset": ("dataset_info.json", "state.json"),
    "dataset_dict": ("dataset_dict.json",),
}
"""Files that ``datasets`` ``save_to_disk`` writes into a ``Dataset`` / ``DatasetDict`` folder."""
PACKAGED_BUILDERS = ("json", "csv", "parquet", "arrow", "text", "pandas", "xml", "webdataset")
"""``dataset.path`` values naming a ``datasets`` builder; its ``data_files`` are relative to the YAML."""


TASK_PATH_KEYS = ("val_file", "test_file", "unseen_test_file", "templates_file")
"""Task keys holding one path relative to the mixture YAML (``files`` holds a list of them)."""


def relocate_raw_mixture(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    """A raw mixture dict (as read from YAML in folder ``root``) with its file paths made absolute, so that
    a copy written elsewhere (a test, a benchmark) reads the same data. ``dataset.path`` may be a hub id and
    is left as it is."""
    out = dict(raw)
    if isinstance(out.get("ood_test_file"), str):
        out["ood_test_file"] = str((root / out["ood_test_file"]).resolve())
    tasks = []
    for task in out.get("tasks") or []:
        task = dict(task)
        files = task.get("files")
        if files is not None:
            task["files"] = [
                str((root / f).resolve()) for f in ([files] if isinstance(files, str) else files)
            ]
        for key in TASK_PATH_KEYS:
            if isinstance(task.get(key), str):
                task[key] = str((root / task[key]).resolve())
        tasks.append(task)
    out["tasks"] = tasks
    return out


def resolve_paths(config: MixtureConfig, root: Path) -> None:
    """Make every path of ``config`` absolute (relative to ``root``, the mixture YAML's folder), in place."""
    for task in config.tasks:
        task.files = [(root / f).resolve() for f in task.files]
        task.val_file = (root / task.val_file).resolve() if task.val_file else None
        task.test_file = (root / task.test_file).resolve() if task.test_file else None
        if task.dataset is not None:
            _resolve_dataset_paths(task.dataset, root)
        task.templates_file = (root / task.templates_file).resolve() if task.templates_file else None
        task.unseen_test_file = (root / task.unseen_test_file).resolve() if task.unseen_test_file else None
    config.ood_test_file = (root / config.ood_test_file).resolve() if config.ood_test_file else None
    # A base model that names an existing folder (relative to the YAML) becomes absolute; anything else
    # ("default", a hub id) is left for base_model.resolve_base_model.
    base = (root / Path(config.base_model).expanduser()) if isinstance(config.base_model, str) else None
    if base is not None and base.is_dir():
        config.base_model = str(base.resolve())


def _resolve_dataset_paths(source: DatasetSource, root: Path) -> None:
    """Make a local ``path`` absolute (a hub id or builder name stays) and builder ``data_files`` too."""
    if not isinstance(source.path, str) or not source.path:
        return
    local = (root / Path(source.path).expanduser()).resolve()
    # "data/chat" is a hub id unless the folder "data" exists here: then it is a local path (maybe a typo).
    first_folder_here = "/" in source.path and (root / source.path.split("/")[0]).is_dir()
    if local.exists() or looks_like_local_path(source.path) or first_folder_here:
        source.path = str(local)
    elif source.path in PACKAGED_BUILDERS and source.data_files is not None:
        # Only a builder's data_files are ours to resolve: a folder's are relative to the folder and a hub
        # dataset's to its repository, as datasets.load_dataset reads them.
        source.data_files = _resolve_data_files(source.data_files, root)


def _resolve_data_files(files: Any, root: Path) -> Any:
    if isinstance(files, dict):
        return {split: _resolve_data_files(f, root) for split, f in files.items()}
    if isinstance(files, list):
        return [_resolve_data_files(f, root) for f in files]
    if isinstance(files, str) and "://" not in files:
        return str((root / Path(files).expanduser()).resolve())
    return files


def looks_like_local_path(spec: str) -> bool:
    """True for ``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c`` or ``x.jsonl``: never a hub id or builder name."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or Path(spec).suffix.lower() in (*DATA_SUFFIXES, ".arrow", ".py")
    )


def saved_dataset_kind(folder: Path) -> str | None:
    """``"dataset"`` or ``"dataset_dict"`` for a ``save_to_disk`` folder, else None."""
    for kind, markers in SAVED_DATASET_MARKERS.items():
        if all((folder / m).is_file() for m in markers):
            return kind
    return None
