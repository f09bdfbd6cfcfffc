"""Train one LoRA expert per task in a single run over one base model (or one multitask LoRA).

Each step the :class:`~moe_adapters.sampling.TaskSampler` draws a task; that task's adapter is activated
and updated with its own AdamW state and its own warmup + cosine schedule. Replay rows are mixed into
every batch. Experts are evaluated on their validation rows every ``eval_every`` of their own steps,
stop early after ``patience`` evaluations without improvement (and are no longer sampled), and keep
their best weights. Checkpoints are atomic and ``resume=True`` continues bit-for-bit.

Speed on a small model: batches are length-bucketed (little padding), the LM head and the loss run only
on response positions (prompt logits are never computed), and losses are read back from the device only
every ``log_every`` steps.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moe_adapters.base_model import DEFAULT_BASE_NAME, base_model_sha256, resolve_base_model
from moe_adapters.config import SHARED_ADAPTER, SINGLE_ADAPTER_BUDGETS, MixtureConfig
from moe_adapters.config_load import load_mixture, mixture_yaml
from moe_adapters.data import MixtureData, TaskData, load_mixture_data, training_prompt_spec
from moe_adapters.data_batches import BucketBatcher, collate
from moe_adapters.data_rows import Row
from moe_adapters.data_tokenize import IGNORE_INDEX, Example, tokenize_rows
from moe_adapters.recipes import (
    RECIPE_METRIC,
    format_decisions,
    keep_if_better,
    relabel_router_prompts,
    serving_adapters,
)
from moe_adapters.run_dir import (
    CHECKPOINT_NAME,
    RUN_MARKER,
    RunDirState,
    fsync_tree,
    run_dir_state,
    write_json_atomic,
)
from moe_adapters.sampling import TaskSampler, temperature_probabilities
from moe_adapters.templates import render_all

FORMAT_VERSION = 1
MULTITASK_NAME = "multitask"
_ADAPTER_PREFIX = "expert_"  # PEFT warns about adapter names that are substrings of "lora_"
_SYSFS_CPU = Path("/sys/devices/system/cpu")


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says how to fix it."""


@dataclass
class ExpertState:
    """Optimizer, schedule and bookkeeping of one adapter."""

    name: str
    tasks: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]
    steps: int = 0
    tokens: int = 0
    step_time_s: float = 0.0
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    stopped_early: bool = False
    last_eval_step: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def adapter(self) -> str:
        """PEFT adapter name."""
        return _ADAPTER_PREFIX + self.name

    def counters(self) -> dict[str, Any]:
        """Plain-data part of the state (for checkpoints)."""
        keys = (
            "steps",
            "tokens",
            "step_time_s",
            "best_val_loss",
            "evals_without_improvement",
            "stopped_early",
            "last_eval_step",
            "train_curve",
            "val_curve",
        )
        return {k: getattr(self, k) for k in keys}


@dataclass
class Trainer:
    """Everything the training loop touches; built by :func:`train_mixture`."""

    config: MixtureConfig
    data: MixtureData
    model: Any
    pad_id: int
    device: torch.device
    experts: dict[str, ExpertState]
    expert_of_task: dict[str, str]
    sampler: TaskSampler
    batchers: dict[str, BucketBatcher]
    replay_examples: list[Example]
    replay_batcher: BucketBatcher | None
    global_step: int = 0
    train_time_s: float = 0.0
    pending: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)
    active_adapter: str | None = None
    budget: dict[str, Any] | None = None
    """The single adapter's training budget (:func:`apply_budget`); None for an experts' run."""
    shared_done: bool = True
    """False while the shared warm-up of ``train.shared_steps`` runs (every task trains ``shared``)."""
    shared_examples: dict[str, tuple[list[Example], list[Example]]] | None = None
    """Per expert task, (train, val) examples as the shared adapter sees them (no task system prompt)."""


def train_mixture(
    mixture_path: Path,
    out_dir: Path,
    *,
    resume: bool = False,
    single_adapter: bool = False,
    budget: str = "total",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Train all experts of ``mixture_path`` into run dir ``out_dir`` (see README "Module contracts") and return it.

    ``resume=True`` continues from ``out_dir/checkpoint.pt``; without a checkpoint it starts from step 0
    (one line on stderr) and on a finished run it refuses (see :func:`check_out_dir`);
    ``single_adapter=True`` trains one LoRA on all tasks (``experts/multitask/``, no router) for the
    steps its ``budget`` allows (:func:`single_adapter_max_steps`);
    ``overrides`` are dotted mixture keys, e.g. ``{"train.max_steps": 20}``.
    """
    wall_start = time.perf_counter()
    out_dir = Path(out_dir).expanduser().resolve()
    state = check_out_dir(out_dir, resume)
    config = load_mixture(mixture_path, overrides)
    budget_record = apply_budget(config, single_adapter, budget)
    drop_recipes_for_single_adapter(config, single_adapter)
    checkpoint = out_dir / CHECKPOINT_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    base_path = resolve_base_model(None if config.base_model == "default" else config.base_model)
    tokenizer = _load_tokenizer(base_path)
    data = load_mixture_data(config, tokenizer, single_adapter=single_adapter)
    report_long_rows(data, config.train.long_rows)
    expert_tasks = [t.name for t in config.expert_tasks]
    probabilities = temperature_probabilities(
        {t: data.sizes()[t] for t in expert_tasks}, config.sampling.temperature, config.sampling.cap
    )
    mixture_text = mixture_yaml(config, probabilities)
    mixture_sha = hashlib.sha256(mixture_text.encode() + str(single_adapter).encode()).hexdigest()
    saved = read_checkpoint(checkpoint, mixture_sha) if state == "resumable" else None
    (out_dir / "mixture.yaml").write_text(mixture_text)
    torch.set_num_threads(choose_num_threads(config.train.num_threads))
    if progress:
        reason = _threads_reason(config.train.num_threads)
        print(f"torch threads: {torch.get_num_threads()} ({reason})", file=sys.stderr, flush=True)
    torch.manual_seed(config.train.seed)
    trainer = build_trainer(config, data, base_path, tokenizer, probabilities, single_adapter)
    trainer.budget = budget_record
    if config.train.shared_steps > 0:
        start_shared_phase(trainer, tokenizer)
    if saved is not None:
        load_checkpoint(trainer, saved)
    run_training(trainer, out_dir, mixture_sha, progress=progress)
    finalize_run(trainer, out_dir, base_path, mixture_sha, single_adapter, time.perf_counter() - wall_start)
    checkpoint.unlink(missing_ok=True)
    return out_dir


def single_adapter_max_steps(max_steps: int, n_experts: int, budget: str) -> int:
    """Optimizer steps of the single multi-task adapter compared with an experts' run of ``max_steps``.

    ``total``: ``max_steps``, the experts' run's total (the experts share those steps, so both sides take
    the same number of optimizer steps of the same batch size: about equal training tokens).
    ``per-expert``: ``max_steps / n_experts`` rounded (at least 1), the steps one expert gets on average
    (expert i gets about ``max_steps × p_i`` of the sampler): equal steps per adapter, about 1/n the tokens.
    """
    if budget not in SINGLE_ADAPTER_BUDGETS:
        raise TrainError(f"unknown budget {budget!r}: use one of {', '.join(SINGLE_ADAPTER_BUDGETS)}")
    if budget == "total":
        return max_steps
    return max(1, round(max_steps / max(1, n_experts)))


def apply_budget(config: MixtureConfig, single_adapter: bool, budget: str) -> dict[str, Any] | None:
    """Set ``config.train.max_steps`` of a single-adapter run to its budget; the record for metrics.json
    and run.json (None for an experts' run, where a budget other than ``total`` is an error)."""
    if not single_adapter:
        if budget != "total":
            raise TrainError(f"budget {budget!r} applies to --single-adapter runs only: add --single-adapter")
        return None
    experts_max_steps, n_experts = config.train.max_steps, len(config.expert_tasks)
    config.train.max_steps = single_adapter_max_steps(experts_max_steps, n_experts, budget)
    return {
        "budget": budget,
        "max_steps": config.train.max_steps,
        "experts_max_steps": experts_max_steps,
        "n_experts": n_experts,
    }


def drop_recipes_for_single_adapter(config: MixtureConfig, single_adapter: bool) -> None:
    """A single-adapter run is the multi-task baseline: ``train.shared_steps`` / ``keep_if_better`` do not
    apply (it trains one adapter for all its steps); they are set off with a note."""
    tr = config.train
    if single_adapter and (tr.shared_steps or tr.keep_if_better):
        print(
            "--single-adapter: train.shared_steps and train.keep_if_better do not apply (one adapter trains "
            "all steps); ignored",
            file=sys.stderr,
        )
        tr.shared_steps, tr.keep_if_better = 0, False


def report_long_rows(data: MixtureData, policy: str) -> None:
    """One line per task whose rows over train.max_length were skipped or truncated (train.long_rows)."""
    for name, task in data.tasks.items():
        done = {k: v for k, v in task.long_rows.items() if v}
        if done:
            what = ", ".join(f"{v} {k}" for k, v in done.items())
            print(
                f"task {name}: rows over train.max_length: {what} (train.long_rows: {policy})",
                file=sys.stderr,
            )


def check_out_dir(out_dir: Path, resume: bool) -> RunDirState:
    """Refuse what would lose or silently redo work, before anything is loaded; return the state.

    A finished run is never trained over (with or without ``resume``: retraining it from step 0 would
    overwrite it); a checkpoint is only continued with ``resume``. ``resume`` without a checkpoint starts
    fresh, like PyTorch Lightning's ``ckpt_path="last"``, so a job script can always pass ``--resume``.
    """
    state = run_dir_state(out_dir)
    if state == "finished":
        action = "--resume has nothing to continue" if resume else "training again would overwrite it"
        raise TrainError(
            f"{out_dir} already holds a finished run ({RUN_MARKER}): {action}; "
            "train into a new --out (nothing was changed)"
        )
    if state == "resumable" and not resume:
        raise TrainError(
            f"{out_dir} already holds a run stopped at a checkpoint ({CHECKPOINT_NAME}): "
            "pass resume=True (--resume) to continue it, or choose a new out dir"
        )
    if resume and state != "resumable":
        print(f"resume: no {CHECKPOINT_NAME} in {out_dir}: starting from step 0", file=sys.stderr)
    return state


def _load_tokenizer(base_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise TrainError(f"{base_path} has no chat template: use an instruct/chat base model")
    return tokenizer


def choose_num_threads(configured: int | None = None) -> int:
    """Intra-op threads: ``configured``, else every physical core this process may run on.

    Measured on a 2-core machine: subtracting the load average (the previous default) left training on 1
    core right after another job had finished (147 vs 268 tokens/s). Hyperthreads are not counted (they
    share a core's matrix units). On a machine shared with other CPU-heavy jobs, set ``train.num_threads``:
    OpenMP threads spin at barriers while a peer is descheduled, so oversubscription costs a lot.
    """
    return configured if configured else physical_cores()


def _threads_reason(configured: int | None) -> str:
    if configured:
        return "train.num_threads"
    return "all physical cores; set train.num_threads to change"


def physical_cores() -> int:
    """Physical cores among the CPUs in this process's affinity set (Linux sysfs topology).

    Falls back to ``psutil.cpu_count(logical=False)`` bounded by the affinity set where the topology
    cannot be read (other systems, restricted /sys).
    """
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
    else:
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = _SYSFS_CPU / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            import psutil

            return max(1, min(len(cpus), psutil.cpu_count(logical=False) or len(cpus)))
    return max(1, len(cores))


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16 weights) when available, else CPU in fp32 (bf16 LoRA training on CPU is ~10x slower)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def build_trainer(
    config: MixtureConfig,
    data: MixtureData,
    base_path: str,
    tokenizer: Any,
    probabilities: dict[str, float],
    single_adapter: bool,
) -> Trainer:
    """Load the base once, add one adapter per expert and set up optimizers, schedules and batchers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device, dtype = pick_device()
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
    model.config.use_cache = False
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = config.lora
    lora_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    tasks = list(probabilities)
    groups = {MULTITASK_NAME: tasks} if single_adapter else {t: [t] for t in tasks}
    if not single_adapter and config.train.shared_steps > 0:
        groups[SHARED_ADAPTER] = tasks
    names = list(groups)
    peft_model = get_peft_model(model, lora_config, adapter_name=_ADAPTER_PREFIX + names[0])
    for name in names[1:]:
        peft_model.add_adapter(_ADAPTER_PREFIX + name, lora_config)
    peft_model.train()
    experts = {}
    for name, members in groups.items():
        params = [p for n, p in peft_model.named_parameters() if f".{_ADAPTER_PREFIX}{name}." in n]
        expected = expected_steps(config, name, members, probabilities)
        # fused: one kernel for all of an adapter's tensors instead of ~10 ops per tensor.
        optimizer = torch.optim.AdamW(
            params, lr=config.train.lr, weight_decay=config.train.weight_decay, fused=True
        )
        schedule = warmup_cosine(config.train.warmup_steps, expected)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        experts[name] = ExpertState(name, members, optimizer, scheduler, params)
    replay = [ex for t in config.replay_tasks for ex in data.tasks[t.name].train_examples]
    bs = config.train.batch_size
    n_replay = min(bs - 1, round(bs * config.train.replay_share)) if replay else 0
    seed = config.train.seed
    return Trainer(
        config=config,
        data=data,
        model=peft_model,
        pad_id=tokenizer.pad_token_id,
        device=device,
        experts=experts,
        expert_of_task={t: name for name, members in groups.items() for t in members},
        sampler=TaskSampler(probabilities, seed=config.sampling.seed),
        batchers={
            t: BucketBatcher(
                [len(e.input_ids) for e in data.tasks[t].train_examples],
                config.train.batch_size - n_replay,
                seed=hash_seed(seed, t),
            )
            for t in tasks
        },
        replay_examples=replay,
        replay_batcher=BucketBatcher([len(e.input_ids) for e in replay], n_replay, hash_seed(seed, "replay"))
        if n_replay
        else None,
    )


def expected_steps(
    config: MixtureConfig, name: str, members: list[str], probabilities: dict[str, float]
) -> int:
    """Steps an adapter's cosine schedule spans: ``shared_steps`` for the shared adapter, else its sampling
    share of the steps left after the shared warm-up (all of ``max_steps`` without one)."""
    tr = config.train
    if name == SHARED_ADAPTER and tr.shared_steps > 0:
        return tr.shared_steps
    return max(1, round((tr.max_steps - tr.shared_steps) * sum(probabilities[t] for t in members)))


# ------------------------------------------------------------------------ recipe: shared warm-up phase


def start_shared_phase(trainer: Trainer, tokenizer: Any) -> None:
    """Begin with the shared warm-up: every task trains the ``shared`` adapter on rows rendered as it is
    served (no task system prompt); :func:`end_shared_phase` hands over to the experts."""
    trainer.shared_examples = shared_view_examples(trainer, tokenizer)
    set_phase(trainer, shared_done=False)


def shared_view_examples(trainer: Trainer, tokenizer: Any) -> dict[str, tuple[list[Example], list[Example]]]:
    """(train, val) examples of each expert task rendered for the shared adapter, row for row the same as
    the expert's (the batchers index both); raise when a row no longer fits ``train.max_length``."""
    tr = trainer.config.train
    out = {}
    for task in trainer.experts[SHARED_ADAPTER].tasks:
        data = trainer.data.tasks[task]
        spec = training_prompt_spec(data.config, single_adapter=True)
        views = []
        for rows, examples in ((data.train, data.train_examples), (data.val, data.val_examples)):
            problems: list[str] = []
            _, shared = tokenize_rows(rows, tokenizer, tr.max_length, problems, spec=spec, long_rows="skip")
            if problems or len(shared) != len(examples):
                raise TrainError(
                    f"task {task}: {len(examples) - len(shared)} rows exceed train.max_length={tr.max_length} "
                    "when rendered for the shared adapter (without the task's system prompt, the chat "
                    "template may add its default one): raise train.max_length"
                )
            views.append(shared)
        out[task] = (views[0], views[1])
    return out


def set_phase(trainer: Trainer, *, shared_done: bool) -> None:
    """Route every task to the shared adapter (warm-up) or to its own expert (after it)."""
    trainer.shared_done = shared_done
    for task in trainer.experts[SHARED_ADAPTER].tasks:
        trainer.expert_of_task[task] = task if shared_done else SHARED_ADAPTER


def shared_phase_due(trainer: Trainer) -> bool:
    """The warm-up is over: ``shared_steps`` taken, or the shared adapter stopped early (patience)."""
    if trainer.shared_done:
        return False
    shared = trainer.experts[SHARED_ADAPTER]
    return trainer.global_step >= trainer.config.train.shared_steps or shared.stopped_early


def end_shared_phase(trainer: Trainer) -> str:
    """Freeze the shared adapter at its best weights and copy them into every expert.

    The experts keep their fresh AdamW state and their own warmup + cosine schedule (built over the steps
    after the warm-up): the shared adapter's Adam moments are averages over all tasks' gradients, and a
    new warmup lets each expert move off the shared point gently. Returns the log line.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    shared = trainer.experts[SHARED_ADAPTER]
    early = shared.stopped_early
    flush_losses(trainer)
    if shared.last_eval_step != shared.steps or shared.best_state is None:
        record_eval(trainer, shared)
        shared.stopped_early = early  # a last eval without improvement does not make the end "early"
    weights = shared.best_state
    if weights is None:  # no validation rows: the last weights
        state = get_peft_model_state_dict(trainer.model, adapter_name=shared.adapter)
        weights = shared.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    for expert in trainer.experts.values():
        set_peft_model_state_dict(trainer.model, weights, adapter_name=expert.adapter)
    set_phase(trainer, shared_done=True)
    why = "stopped early" if early else "shared_steps reached"
    best = "n/a" if math.isinf(shared.best_val_loss) else f"{shared.best_val_loss:.4f}"
    return (
        f"step {trainer.global_step}: shared warm-up done after {shared.steps} steps ({why}, best val loss "
        f"{best}); {len(trainer.experts) - 1} experts start from the shared weights for the remaining "
        f"{trainer.config.train.max_steps - trainer.global_step} steps"
    )


def hash_seed(seed: int, name: str) -> int:
    """Stable per-name seed (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR factor: linear warmup, then cosine decay to ``floor`` at ``total_steps`` (held after)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def response_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, number of target tokens): the LM head runs on response positions only."""
    causal_lm = model.base_model.model  # the transformers model with LoRA layers injected in place
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
    count = keep.sum()
    return F.cross_entropy(logits.float(), targets[keep]), count


def _activate(trainer: Trainer, expert: ExpertState) -> None:
    if trainer.active_adapter != expert.adapter:
        trainer.model.base_model.set_adapter(expert.adapter)
        trainer.active_adapter = expert.adapter


def task_examples(trainer: Trainer, task: str, expert: ExpertState) -> tuple[list[Example], list[Example]]:
    """(train, val) examples of ``task`` as ``expert`` sees them (the shared adapter: its own rendering)."""
    if expert.name == SHARED_ADAPTER and trainer.shared_examples is not None:
        return trainer.shared_examples[task]
    data = trainer.data.tasks[task]
    return data.train_examples, data.val_examples


def train_step(trainer: Trainer) -> tuple[str, int]:
    """One optimizer step on the expert of a sampled task; returns (task, tokens in the batch)."""
    task = trainer.sampler.sample()
    expert = trainer.experts[trainer.expert_of_task[task]]
    source = task_examples(trainer, task, expert)[0]
    examples = [source[i] for i in next(trainer.batchers[task])]
    if trainer.replay_batcher is not None:
        examples += [trainer.replay_examples[i] for i in next(trainer.replay_batcher)]
    tokens = sum(len(e.input_ids) for e in examples)
    batch = {k: v.to(trainer.device, non_blocking=True) for k, v in collate(examples, trainer.pad_id).items()}
    _activate(trainer, expert)
    start = time.perf_counter()
    loss, _ = response_loss(trainer.model, batch)
    loss.backward()
    if trainer.config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(expert.params, trainer.config.train.grad_clip, foreach=True)
    expert.optimizer.step()
    expert.scheduler.step()
    expert.optimizer.zero_grad(set_to_none=True)
    expert.step_time_s += time.perf_counter() - start
    expert.steps += 1
    expert.tokens += tokens
    trainer.global_step += 1
    trainer.pending.append((trainer.global_step, expert.name, loss.detach()))
    return task, tokens


def flush_losses(trainer: Trainer) -> float | None:
    """Read pending losses back from the device (one sync) into the curves; return the latest loss."""
    if not trainer.pending:
        return None
    values = torch.stack([loss for _, _, loss in trainer.pending]).float().tolist()
    for (step, name, _), value in zip(trainer.pending, values, strict=True):
        trainer.experts[name].train_curve.append((step, value))
    trainer.pending.clear()
    return values[-1]


@torch.no_grad()
def evaluate_expert(trainer: Trainer, expert: ExpertState, tasks: list[str] | None = None) -> float:
    """Token-weighted validation loss of ``expert`` on (at most ``eval_batches`` batches of) the val rows of
    ``tasks`` (default: its own tasks)."""
    bs = trainer.config.train.batch_size
    examples = [ex for t in tasks or expert.tasks for ex in task_examples(trainer, t, expert)[1]]
    if not examples:
        return math.nan
    examples = sorted(
        examples[: bs * max(1, trainer.config.train.eval_batches)], key=lambda e: len(e.input_ids)
    )
    _activate(trainer, expert)
    trainer.model.eval()
    total = torch.zeros((), device=trainer.device)
    count = torch.zeros((), device=trainer.device)
    for i in range(0, len(examples), bs):
        batch = {k: v.to(trainer.device) for k, v in collate(examples[i : i + bs], trainer.pad_id).items()}
        loss, n = response_loss(trainer.model, batch)
        total += loss * n
        count += n
    trainer.model.train()
    return float(total / count)


def record_eval(trainer: Trainer, expert: ExpertState) -> None:
    """Evaluate, keep best weights, and stop the expert after ``patience`` evals without improvement."""
    from peft import get_peft_model_state_dict

    val = evaluate_expert(trainer, expert)
    expert.last_eval_step = expert.steps
    if math.isnan(val):
        return
    expert.val_curve.append((trainer.global_step, val))
    if val < expert.best_val_loss - 1e-6:
        expert.best_val_loss = val
        expert.evals_without_improvement = 0
        state = get_peft_model_state_dict(trainer.model, adapter_name=expert.adapter)
        expert.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        return
    expert.evals_without_improvement += 1
    patience = trainer.config.train.patience
    if patience and expert.evals_without_improvement >= patience and not expert.stopped_early:
        expert.stopped_early = True
        if expert.name == SHARED_ADAPTER:
            return  # ends the warm-up early (shared_phase_due); the tasks' experts still train
        for task in expert.tasks:
            trainer.sampler.remove(task)


def run_training(trainer: Trainer, out_dir: Path, mixture_sha: str, *, progress: bool = True) -> None:
    """The step loop with progress bar, periodic eval, early stopping and checkpoints."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tr = trainer.config.train
    columns = [
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    ]
    window_tokens, window_start = 0, time.perf_counter()
    console = Console(stderr=True)
    # Without a terminal (CI logs, `moea demo` subprocesses) a live bar shows nothing until the end:
    # print one plain line per log window instead.
    plain_lines = progress and not console.is_terminal
    with Progress(*columns, console=console, disable=not progress or plain_lines) as bar:
        bar_id = bar.add_task("train", total=tr.max_steps, completed=trainer.global_step, info="")
        while trainer.global_step < tr.max_steps and len(trainer.sampler) > 0:
            if shared_phase_due(trainer):
                message = end_shared_phase(trainer)
                if progress:
                    console.print(message, highlight=False)
            start = time.perf_counter()
            task, tokens = train_step(trainer)
            trainer.train_time_s += time.perf_counter() - start
            window_tokens += tokens
            expert = trainer.experts[trainer.expert_of_task[task]]
            if tr.eval_every and expert.steps % tr.eval_every == 0:
                record_eval(trainer, expert)
            step = trainer.global_step
            if tr.log_every and step % tr.log_every == 0 or step == tr.max_steps:
                loss = flush_losses(trainer)
                elapsed = max(1e-9, time.perf_counter() - window_start)
                info = f"task={task} loss={loss:.3f} {window_tokens / elapsed:,.0f} tok/s"
                bar.update(bar_id, completed=step, info=info)
                if plain_lines:
                    console.print(f"train step {step}/{tr.max_steps} {info}", highlight=False)
                window_tokens, window_start = 0, time.perf_counter()
            else:
                bar.update(bar_id, completed=step)
            if tr.checkpoint_every and step % tr.checkpoint_every == 0 and step < tr.max_steps:
                save_checkpoint(trainer, out_dir / CHECKPOINT_NAME, mixture_sha)
    flush_losses(trainer)
    for expert in trainer.experts.values():
        if expert.last_eval_step != expert.steps or expert.best_state is None:
            record_eval(trainer, expert)


def save_checkpoint(trainer: Trainer, path: Path, mixture_sha: str) -> None:
    """Write every piece of training state to ``path`` atomically (temp file + rename)."""
    from peft import get_peft_model_state_dict

    flush_losses(trainer)
    state = {
        "format_version": FORMAT_VERSION,
        "mixture_sha256": mixture_sha,
        "global_step": trainer.global_step,
        "train_time_s": trainer.train_time_s,
        "sampler": trainer.sampler.state_dict(),
        "batchers": {t: b.state_dict() for t, b in trainer.batchers.items()},
        "replay_batcher": trainer.replay_batcher.state_dict() if trainer.replay_batcher else None,
        "shared_done": trainer.shared_done,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "experts": {
            name: {
                "adapter": get_peft_model_state_dict(trainer.model, adapter_name=e.adapter),
                "optimizer": e.optimizer.state_dict(),
                "scheduler": e.scheduler.state_dict(),
                "best_state": e.best_state,
                "counters": e.counters(),
            }
            for name, e in trainer.experts.items()
        },
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: Path, mixture_sha: str) -> dict[str, Any]:
    """Load ``path``; refuse a checkpoint written for other settings (resuming it would not be exact)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("mixture_sha256") != mixture_sha:
        raise TrainError(
            f"{path} was written for a different mixture/overrides: rerun with the same "
            "settings, or delete the checkpoint to start over"
        )
    return state


def load_checkpoint(trainer: Trainer, state: dict[str, Any]) -> None:
    """Restore adapters, optimizers, schedules, sampler, batch order, RNG and counters from a checkpoint."""
    from peft import set_peft_model_state_dict

    for name, saved in state["experts"].items():
        expert = trainer.experts[name]
        set_peft_model_state_dict(trainer.model, saved["adapter"], adapter_name=expert.adapter)
        expert.optimizer.load_state_dict(saved["optimizer"])
        expert.scheduler.load_state_dict(saved["scheduler"])
        expert.best_state = saved["best_state"]
        for key, value in saved["counters"].items():
            setattr(expert, key, [tuple(p) for p in value] if key.endswith("_curve") else value)
    trainer.sampler.load_state_dict(state["sampler"])
    for task, batcher_state in state["batchers"].items():
        trainer.batchers[task].load_state_dict(batcher_state)
    if trainer.replay_batcher is not None and state["replay_batcher"] is not None:
        trainer.replay_batcher.load_state_dict(state["replay_batcher"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    trainer.global_step = state["global_step"]
    trainer.train_time_s = state["train_time_s"]
    if SHARED_ADAPTER in trainer.experts:
        set_phase(trainer, shared_done=state["shared_done"])


def save_expert(trainer: Trainer, expert: ExpertState, folder: Path, base_path: str) -> None:
    """Write the expert's best weights as a standard PEFT adapter directly in ``folder`` (atomic)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import save_file

    if expert.best_state is not None:
        set_peft_model_state_dict(trainer.model, expert.best_state, adapter_name=expert.adapter)
    # PEFT's save_pretrained nests non-default adapters in sub-folders; write the two files ourselves.
    weights = get_peft_model_state_dict(trainer.model, adapter_name=expert.adapter)
    lora_config = copy.deepcopy(trainer.model.peft_config[expert.adapter])
    lora_config.base_model_name_or_path = base_path
    lora_config.inference_mode = True
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            str(tmp / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        lora_config.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapters(trainer: Trainer, out_dir: Path, base_path: str) -> dict[str, Any] | None:
    """Save every adapter; return the ``recipe`` record for metrics.json (None without a shared warm-up).

    Served adapters go to ``experts/<name>/``. With a shared warm-up, the shared adapter goes to
    ``experts/shared/`` where keep-if-better gave it a task, else to ``candidates/shared/``; an expert that
    lost to it goes to ``candidates/<task>/`` (kept for inspection, never registered).
    """
    recipe = recipe_record(trainer)
    served = set(recipe["serving"].values()) if recipe is not None else set(trainer.experts)
    for name, expert in trainer.experts.items():
        folder = out_dir / ("experts" if name in served else "candidates") / name
        save_expert(trainer, expert, folder, base_path)
    return recipe


def recipe_record(trainer: Trainer) -> dict[str, Any] | None:
    """The shared warm-up's steps and, with ``keep_if_better``, each task's decision (printed too)."""
    if SHARED_ADAPTER not in trainer.experts:
        return None
    tr, shared = trainer.config.train, trainer.experts[SHARED_ADAPTER]
    tasks = list(shared.tasks)
    record: dict[str, Any] = {
        "shared_steps": tr.shared_steps,
        "shared_steps_taken": shared.steps,
        "shared_stopped_early": shared.stopped_early,
        "expert_steps": sum(e.steps for n, e in trainer.experts.items() if n != SHARED_ADAPTER),
        "keep_if_better": tr.keep_if_better,
        "serving": {t: t for t in tasks},
    }
    if not tr.keep_if_better:
        return record
    if shared.best_state is not None:  # frozen at its best since the warm-up ended; make sure
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.model, shared.best_state, adapter_name=shared.adapter)
    shared_losses = {t: evaluate_expert(trainer, shared, [t]) for t in tasks}
    expert_losses = {t: trainer.experts[t].best_val_loss for t in tasks}
    decisions = keep_if_better(expert_losses, shared_losses)
    record.update({"metric": RECIPE_METRIC, "decisions": decisions, "serving": serving_adapters(decisions)})
    for line in format_decisions(decisions):
        print(line, file=sys.stderr)
    return record


def expert_metrics(trainer: Trainer) -> dict[str, dict[str, Any]]:
    """metrics.json ``experts`` section."""
    out = {}
    for name, e in trainer.experts.items():
        tail = [v for _, v in e.train_curve[-max(1, trainer.config.train.log_every) :]]
        out[name] = {
            "steps": e.steps,
            "best_val_loss": None if math.isinf(e.best_val_loss) else e.best_val_loss,
            "final_train_loss": sum(tail) / len(tail) if tail else None,
            "stopped_early": e.stopped_early,
            "train_tokens": e.tokens,
            "tokens_per_s": e.tokens / e.step_time_s if e.step_time_s else 0.0,
            "tasks": e.tasks,
        }
    return out


def throughput(trainer: Trainer) -> dict[str, float]:
    """Training throughput: tokens (incl. prompt, excl. padding) per second of step time."""
    tokens = sum(e.tokens for e in trainer.experts.values())
    return {
        "tokens_per_s": tokens / trainer.train_time_s if trainer.train_time_s else 0.0,
        "train_tokens": tokens,
        "step_time_s": trainer.train_time_s,
        "steps": trainer.global_step,
    }


def finalize_run(
    trainer: Trainer, out_dir: Path, base_path: str, mixture_sha: str, single_adapter: bool, wall_s: float
) -> None:
    """Write experts/, router/, metrics.json, train_curves.png and (last, atomically, as the completion
    marker) run.json."""
    from moe_adapters.plots import plot_training_curves

    recipe = save_adapters(trainer, out_dir, base_path)
    metrics: dict[str, Any] = {
        "experts": expert_metrics(trainer),
        "train": {
            **throughput(trainer),
            "wall_s": wall_s,
            "device": str(trainer.device),
            "torch_threads": torch.get_num_threads(),
        },
        "data": {
            n: {
                "rows_loaded": t.rows_loaded,
                "duplicates_dropped": t.duplicates_dropped,
                "train": len(t.train),
                "val": len(t.val),
                "test": len(t.test),
                "long_rows": dict(t.long_rows),
            }
            for n, t in trainer.data.tasks.items()
        },
    }
    if trainer.budget is not None:
        metrics["budget"] = trainer.budget
    if recipe is not None:
        metrics["recipe"] = recipe
    if not single_adapter and trainer.config.router.enabled:
        router_start = time.perf_counter()
        serving = (recipe or {}).get("serving")
        metrics["router"] = train_router_for_run(trainer, out_dir, base_path, serving)
        metrics["train"]["router_wall_s"] = time.perf_counter() - router_start
    write_json_atomic(out_dir / "metrics.json", metrics)
    plot_training_curves(
        {n: e.train_curve for n, e in trainer.experts.items()},
        {n: e.val_curve for n, e in trainer.experts.items()},
        out_dir / "train_curves.png",
    )
    run = {
        "format_version": FORMAT_VERSION,
        "base_model": base_path,
        "base_model_name": DEFAULT_BASE_NAME
        if trainer.config.base_model == "default"
        else Path(base_path).name,
        "base_model_sha256": base_model_sha256(base_path),
        "created_at": datetime.now(UTC).isoformat(),
        "mixture_sha256": mixture_sha,
        "git_commit": _git_commit(),
        "single_adapter": single_adapter,
        **({"budget": trainer.budget} if trainer.budget is not None else {}),
        "tasks": {
            t.name: {"kind": t.kind, "system_prompt": t.system_prompt, "prompt_policy": t.prompt_policy}
            for t in trainer.config.expert_tasks
        },
    }
    # run.json is the completion marker (run_dir_state): everything it vouches for reaches the disk first,
    # and it appears whole or not at all.
    fsync_tree(out_dir)
    write_json_atomic(out_dir / RUN_MARKER, run)


def train_router_for_run(
    trainer: Trainer, out_dir: Path, base_path: str, serving: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train the router on the experts' raw prompts (skipped with a warning if router.py is absent).

    ``serving`` ({task: adapter}, keep-if-better) files a task's prompts under the adapter serving it, so
    every router label is an ``experts/`` folder (a task served by ``shared`` is routed to ``shared``).
    """
    try:
        from moe_adapters.router_training import train_router
    except ModuleNotFoundError as exc:
        if exc.name != "moe_adapters.router":
            raise
        warnings.warn("moe_adapters.router is not available: run saved without a router", stacklevel=2)
        return {"skipped": "moe_adapters.router not available"}
    tasks = [t.name for t in trainer.config.expert_tasks]
    train = relabel_router_prompts(
        {t: router_prompts(trainer.data.tasks[t], trainer.data.tasks[t].train) for t in tasks}, serving
    )
    val = relabel_router_prompts(
        {t: router_prompts(trainer.data.tasks[t], trainer.data.tasks[t].val) for t in tasks}, serving
    )
    # Replay prompts are general requests: good out-of-scope examples that should go to the base model.
    negatives = [r.prompt for t in trainer.config.replay_tasks for r in trainer.data.tasks[t.name].train]
    return train_router(
        train, val, out_dir / "router", trainer.config.router, base_model=base_path, negatives=negatives
    )


def router_prompts(task: TaskData, rows: list[Row]) -> list[str]:
    """The prompts the router learns a task from: every template's wording of each row of a templated
    task (so it learns the task, not the one wording a row was drawn with), else each row's prompt.

    ``router.max_train_per_task`` still caps what the router encodes (a deterministic subsample)."""
    templates = task.config.templates or []
    return [
        prompt
        for row in rows
        for prompt in (render_all(templates, row.template.input) if row.template else [row.prompt])
    ]


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
