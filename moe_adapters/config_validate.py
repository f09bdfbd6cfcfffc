"""The mixture validator: a raw YAML mapping type-checked into the config dataclasses, then range-checked.

Every problem is collected (not raised one at a time) and named by its field path
(``tasks[0](sentiment).kind: 'poetry' is not one of [...]``), so one run of ``moea train`` shows them all.
The dataclasses in :mod:`moe_adapters.config` are the only definition of the settings: the type checks
read their annotations.

This stays a hand-written validator rather than pydantic models: pydantic would need a second set of
models (or pydantic dataclasses in place of the plain ones), its messages (``Input should be a valid
integer``, ``tasks.0.kind``, one line per union member) would have to be translated back to these, and its
lax mode accepts what this rejects (``"8"`` for an integer, ``"yes"`` for true/false).
"""

from __future__ import annotations

import dataclasses
import glob
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

from moe_adapters.config import SHARED_ADAPTER, DatasetSource, DpoSettings, MixtureConfig, TrainConfig
from moe_adapters.config_paths import DATA_SUFFIXES, PACKAGED_BUILDERS, saved_dataset_kind

TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# Full fine-tuning practice is 1e-5..2e-4; LoRA adapters on small bases commonly train at up to 1e-3
# (the examples learn their short tasks in ~50 steps there), so only values outside this range warn.
RECOMMENDED_LR = (1e-5, 1e-3)
ROUTER_HEADS = {"linear", "mlp", "centroid"}


def build_config(cls: type, raw: Any, where: str, errors: list[str]) -> Any:
    """Construct dataclass ``cls`` from ``raw``, type-checking fields; problems go to ``errors``."""
    if not isinstance(raw, dict):
        errors.append(f"{where or 'mixture'}: expected a mapping, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_path"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        errors.append(f"{where or 'mixture'}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key}: required")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], key, errors)
    try:
        return cls(**kwargs)
    except TypeError:
        return None


_TYPE_NAMES = {str: "a string", list: "a list", dict: "a mapping", Path: "a path", int: "an integer"}


def _coerce(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    """``value`` as type ``tp`` (a field annotation); a value that does not fit goes to ``errors``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, value, key, errors)
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, key, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        return _coerce_list(args[0] if args else Any, value, key, errors)
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {type(value).__name__}")
            return {}
        return {
            _coerce(args[0], k, key, errors): _coerce(args[1], v, f"{key}.{k}", errors)
            for k, v in value.items()
        }
    return _coerce_scalar(tp, value, key, errors)


def _coerce_union(args: tuple[Any, ...], value: Any, key: str, errors: list[str]) -> Any:
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1:
        return _coerce(inner[0], value, key, errors)
    for option in inner:  # the first type that takes the value without problems wins
        trial: list[str] = []
        coerced = _coerce(option, value, key, trial)
        if not trial:
            return coerced
    kinds = [_TYPE_NAMES.get(typing.get_origin(t) or t, str(t)) for t in inner]
    errors.append(f"{key}: expected {' or '.join(kinds)}, got {value!r}")
    return value


def _coerce_list(item_type: Any, value: Any, key: str, errors: list[str]) -> list[Any]:
    if isinstance(value, str | Path) and item_type is Path:
        value = [value]  # `files: data.jsonl` is accepted as a one-item list
    if not isinstance(value, list):
        errors.append(f"{key}: expected a list, got {type(value).__name__}")
        return []
    return [_coerce(item_type, v, f"{key}[{i}]", errors) for i, v in enumerate(value)]


def _coerce_scalar(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    if tp is Path:
        if not isinstance(value, str | Path):
            errors.append(f"{key}: expected a path, got {type(value).__name__}")
            return Path()
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{key}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{key}: expected a string, got {value!r}")
        return value
    return value


def validate_mixture(config: MixtureConfig) -> list[str]:
    """All problems of a constructed mixture (empty list: valid). Warns on an unusual learning rate."""
    names = [t.name for t in config.tasks]
    errors = _validate_tasks(config)
    errors += _validate_sampling_splits_lora(config)
    errors += _validate_train(config.train)
    if config.train.shared_steps > 0 and SHARED_ADAPTER in names:
        errors.append(
            f"tasks: {SHARED_ADAPTER!r} names the shared adapter of train.shared_steps; rename that task"
        )
    errors += _validate_router(config)
    errors += _validate_dpo(config.dpo)
    lr = config.train.lr
    if not errors and not RECOMMENDED_LR[0] <= lr <= RECOMMENDED_LR[1]:
        warnings.warn(
            f"train.lr={lr:g} is outside the recommended range {RECOMMENDED_LR[0]:g}..{RECOMMENDED_LR[1]:g}"
            " for LoRA on small models",
            stacklevel=3,
        )
    return errors


def _validate_tasks(config: MixtureConfig) -> list[str]:
    errors: list[str] = []
    names = [t.name for t in config.tasks]
    if not config.tasks:
        errors.append("tasks: at least one task is required")
    elif not config.expert_tasks:
        errors.append("tasks: every task has replay: true; at least one must be an expert")
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"tasks: name {dup!r} used more than once")
    for i, task in enumerate(config.tasks):
        key = f"tasks[{i}]({task.name})"
        if not isinstance(task.name, str) or not TASK_NAME_RE.match(task.name):
            errors.append(f"{key}.name: must match [a-z0-9][a-z0-9_-]* (e.g. 'sentiment_en')")
        if task.prompt_policy == "never" and task.system_prompt:
            errors.append(
                f"{key}.prompt_policy: 'never' uses the messages as given, so system_prompt would be used "
                "nowhere; remove system_prompt or use if-absent / prepend"
            )
        if not task.files and task.dataset is None:
            errors.append(
                f"{key}: give files (data files or save_to_disk folders) or dataset ({{path: ...}})"
            )
        errors += [
            f"{key}: {p}"
            for f in [*task.files, task.val_file, task.test_file, task.unseen_test_file]
            if (p := _file_problem(f))
        ]
        if task.dataset is not None:
            errors += [f"{key}.dataset.{p}" for p in _dataset_problems(task.dataset)]
    if config.ood_test_file is not None and not config.ood_test_file.is_file():
        errors.append(
            f"ood_test_file: {config.ood_test_file} not found (paths are relative to the mixture YAML)"
        )
    return errors


def _validate_sampling_splits_lora(config: MixtureConfig) -> list[str]:
    errors = []
    s, sp, lo = config.sampling, config.splits, config.lora
    if s.temperature <= 0:
        errors.append(f"sampling.temperature: must be > 0, got {s.temperature}")
    if s.cap is not None and s.cap < 1:
        errors.append(f"sampling.cap: must be >= 1 or null, got {s.cap}")
    if min(sp.train, sp.val, sp.test) < 0 or abs(sp.train + sp.val + sp.test - 1.0) > 1e-6:
        errors.append(
            f"splits: train+val+test must be non-negative and sum to 1, got {sp.train}/{sp.val}/{sp.test}"
        )
    if sp.train <= 0:
        errors.append("splits.train: must be > 0")
    if lo.r < 1 or lo.alpha <= 0:
        errors.append(f"lora: r must be >= 1 and alpha > 0, got r={lo.r} alpha={lo.alpha}")
    if not 0 <= lo.dropout < 1:
        errors.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    if not lo.target_modules:
        errors.append("lora.target_modules: at least one module name is required")
    return errors


def _validate_router(config: MixtureConfig) -> list[str]:
    errors = []
    r = config.router
    if r.epochs < 1 or r.lr <= 0 or r.batch_size < 1 or not 0 < r.target_error < 1:
        errors.append("router: epochs >= 1, lr > 0, batch_size >= 1 and 0 < target_error < 1 are required")
    unknown_heads = sorted(set(r.heads) - ROUTER_HEADS)
    if unknown_heads or not r.heads:
        errors.append(f"router.heads: use one or more of linear, mlp, centroid (got {r.heads})")
    return errors


def _file_problem(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.exists():
        return f"data file {path} not found (paths are relative to the mixture YAML)"
    if path.is_dir():
        if saved_dataset_kind(path) is None:
            return (
                f"{path} is a folder but no datasets save_to_disk folder (no dataset_info.json + state.json"
                f" or dataset_dict.json); for a folder of data files use dataset: {{path: {path}}}"
            )
        return None
    if path.suffix.lower() not in DATA_SUFFIXES:
        return (
            f"{path.name}: unsupported file type; use one of {list(DATA_SUFFIXES)} or a save_to_disk folder"
        )
    return None


def _dataset_problems(source: DatasetSource) -> list[str]:
    if not isinstance(source.path, str) or not source.path.strip():
        return ["path: required (a hub id, a builder such as parquet, or a local folder or file)"]
    problems = []
    if Path(source.path).is_absolute() and not Path(source.path).exists():
        problems.append(f"path: {source.path} not found (paths are relative to the mixture YAML)")
    if source.path in PACKAGED_BUILDERS and not source.data_files:
        problems.append(f"data_files: required with the {source.path!r} builder (files or glob patterns)")
    elif source.path in PACKAGED_BUILDERS:
        for pattern in _flat_data_files(source.data_files):
            if "://" not in pattern and not glob.glob(pattern, recursive=True):
                problems.append(
                    f"data_files: {pattern} matches no file (paths are relative to the mixture YAML)"
                )
    if not isinstance(source.split, str) or not source.split.strip():
        problems.append("split: must be a split name such as train (or a slice such as train[:1000])")
    return problems


def _flat_data_files(files: Any) -> list[str]:
    if isinstance(files, dict):
        return [f for value in files.values() for f in _flat_data_files(value)]
    return [files] if isinstance(files, str) else [f for f in files or [] if isinstance(f, str)]


def _validate_train(tr: TrainConfig) -> list[str]:
    errors = []
    if tr.lr <= 0:
        errors.append(f"train.lr: must be > 0, got {tr.lr}")
    for name in ("max_steps", "batch_size", "max_length"):
        if getattr(tr, name) < 1:
            errors.append(f"train.{name}: must be >= 1, got {getattr(tr, name)}")
    for name in ("warmup_steps", "eval_every", "patience", "checkpoint_every", "eval_batches", "log_every"):
        if getattr(tr, name) < 0:
            errors.append(f"train.{name}: must be >= 0, got {getattr(tr, name)}")
    if tr.grad_clip < 0:
        errors.append(f"train.grad_clip: must be >= 0 (0 disables), got {tr.grad_clip}")
    if not 0 <= tr.replay_share < 1:
        errors.append(f"train.replay_share: must be in [0, 1), got {tr.replay_share}")
    if tr.num_threads is not None and tr.num_threads < 1:
        errors.append(f"train.num_threads: must be >= 1 or null, got {tr.num_threads}")
    if not 0 <= tr.shared_steps < tr.max_steps:
        errors.append(
            f"train.shared_steps: must be >= 0 and < train.max_steps={tr.max_steps} (the experts need steps"
            f" after the shared warm-up), got {tr.shared_steps}"
        )
    if tr.expert_start == "continue" and tr.shared_steps <= 0:
        errors.append(
            "train.expert_start: 'continue' goes on from the shared warm-up, so it needs train.shared_steps > 0"
        )
    if tr.keep_if_better_by != "val_loss" and not tr.keep_if_better:
        errors.append(
            "train.keep_if_better_by: says what keep-if-better compares; set train.keep_if_better: true"
        )
    if tr.keep_if_better and tr.shared_steps <= 0:
        errors.append(
            "train.keep_if_better: compares each expert with the shared adapter, so it needs "
            "train.shared_steps > 0 (e.g. a third of train.max_steps)"
        )
    return errors


def _validate_dpo(dpo: DpoSettings) -> list[str]:
    errors = [
        f"dpo.{name}: must be > 0, got {getattr(dpo, name)}"
        for name in ("beta", "lr")
        if getattr(dpo, name) <= 0
    ]
    errors += [
        f"dpo.{name}: must be >= 1, got {getattr(dpo, name)}"
        for name in ("max_steps", "batch_size", "max_length")
        if getattr(dpo, name) < 1
    ]
    if dpo.sft_weight < 0:
        errors.append(f"dpo.sft_weight: must be >= 0 (0 = plain DPO), got {dpo.sft_weight}")
    return errors
