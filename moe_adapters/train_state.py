"""What the training loop works on: one :class:`ExpertState` per adapter (optimizer, schedule, curves,
early-stopping bookkeeping) inside a :class:`Trainer`, and :func:`build_trainer`, which loads the base
model once and adds every adapter."""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_adapters.config import SHARED_ADAPTER, MixtureConfig
from moe_adapters.data import Example, MixtureData
from moe_adapters.data_batches import BucketBatcher
from moe_adapters.fsdp import broadcast_rank0_weights, shard_base
from moe_adapters.hardware import pick_device
from moe_adapters.parallel import Parallel
from moe_adapters.quantize import QUANTIZE_4BIT, load_training_base
from moe_adapters.sampling import TaskSampler

MULTITASK_NAME = "multitask"
_ADAPTER_PREFIX = "expert_"  # PEFT warns about adapter names that are substrings of "lora_"


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
    parallel: Parallel = field(default_factory=Parallel)
    """This process's rank in a data-parallel run (one process by default)."""


def build_trainer(
    config: MixtureConfig,
    data: MixtureData,
    base_path: str,
    tokenizer: Any,
    probabilities: dict[str, float],
    single_adapter: bool,
    parallel: Parallel | None = None,
) -> Trainer:
    """Load the base once, add one adapter per expert and set up optimizers, schedules and batchers.

    Under a data-parallel ``parallel`` every rank builds the same sampler and batchers (same seeds)."""
    parallel = parallel or Parallel()
    tasks = list(probabilities)
    groups = {MULTITASK_NAME: tasks} if single_adapter else {t: [t] for t in tasks}
    if not single_adapter and config.train.shared_steps > 0:
        groups[SHARED_ADAPTER] = tasks
    device, peft_model = _model_with_adapters(config, base_path, list(groups), parallel)
    experts = {
        name: _expert_state(config, peft_model, name, members, probabilities)
        for name, members in groups.items()
    }
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
        parallel=parallel,
    )


def _model_with_adapters(
    config: MixtureConfig, base_path: str, names: list[str], parallel: Parallel
) -> tuple[torch.device, Any]:
    """The base model on the training device (the rank's, else :func:`pick_device`'s) with one LoRA adapter
    per name, in training mode (added in ``names`` order: each LoRA init draws from torch's RNG, which the
    run's seed fixes); with ``train.quantize: 4bit`` the base is loaded in 4-bit (QLoRA). Under FSDP the
    base's decoder layers are then sharded across the ranks (:mod:`moe_adapters.fsdp`)."""
    from peft import LoraConfig, get_peft_model

    default_device, dtype = pick_device()
    device = parallel.device or default_device
    model = load_training_base(
        base_path, device, dtype, config.train.quantize, config.train.gradient_checkpointing
    )
    if parallel.fsdp is not None:
        broadcast_rank0_weights(model)
    if config.train.gradient_checkpointing and config.train.quantize != QUANTIZE_4BIT:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = config.lora
    lora_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config, adapter_name=_ADAPTER_PREFIX + names[0])
    for name in names[1:]:
        peft_model.add_adapter(_ADAPTER_PREFIX + name, lora_config)
    peft_model.train()
    if parallel.fsdp is not None:
        layers = shard_base(peft_model, parallel.fsdp, device, parallel.world_size)
        if parallel.is_main:
            mode = "FULL_SHARD" if parallel.fsdp.reshard_after_forward else "SHARD_GRAD_OP"
            print(
                f"FSDP: {layers} decoder layers sharded over {parallel.world_size} ranks ({mode}); "
                "adapters, embeddings and LM head replicated",
                file=sys.stderr,
                flush=True,
            )
    return device, peft_model


def _expert_state(
    config: MixtureConfig, model: Any, name: str, members: list[str], probabilities: dict[str, float]
) -> ExpertState:
    """Adapter ``name``'s parameters with its own AdamW and warmup + cosine schedule."""
    params = [p for n, p in model.named_parameters() if f".{_ADAPTER_PREFIX}{name}." in n]
    expected = expected_steps(config, name, members, probabilities)
    # fused: one kernel for all of an adapter's tensors instead of ~10 ops per tensor.
    optimizer = torch.optim.AdamW(
        params, lr=config.train.lr, weight_decay=config.train.weight_decay, fused=True
    )
    tr = config.train
    if tr.expert_start == "continue" and tr.shared_steps > 0:
        offset = 0 if name == SHARED_ADAPTER else tr.shared_steps
        schedule: Callable[[float], float] = RunSchedule(tr.warmup_steps, tr.max_steps, offset, expected)
    else:
        schedule = warmup_cosine(tr.warmup_steps, expected)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return ExpertState(name, members, optimizer, scheduler, params)


def expected_steps(
    config: MixtureConfig, name: str, members: list[str], probabilities: dict[str, float]
) -> int:
    """Steps an adapter's cosine schedule spans: ``shared_steps`` for the shared adapter, else its sampling
    share of the steps left after the shared warm-up (all of ``max_steps`` without one)."""
    tr = config.train
    if name == SHARED_ADAPTER and tr.shared_steps > 0:
        return tr.max_steps if tr.expert_start == "continue" else tr.shared_steps
    return max(1, round((tr.max_steps - tr.shared_steps) * sum(probabilities[t] for t in members)))


def hash_seed(seed: int, name: str) -> int:
    """Stable per-name seed (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def warmup_cosine_factor(step: float, warmup_steps: int, total_steps: int, floor: float = 0.1) -> float:
    """LR factor at ``step``: linear warmup, then cosine decay to ``floor`` at ``total_steps`` (held after)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1) -> Callable[[float], float]:
    """:func:`warmup_cosine_factor` as a function of the step alone (for ``LambdaLR``)."""
    return functools.partial(
        warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps, floor=floor
    )


class RunSchedule:
    """LR factor of ``train.expert_start: continue``: one warmup + cosine over the run's ``total_steps``
    global steps (:func:`warmup_cosine`), read by an adapter that starts at global step ``offset`` and is
    expected to take ``own_steps`` of the global steps after it (its own step ``s`` is global step
    ``offset + s * (total_steps - offset) / own_steps``). The shared adapter reads it from 0 over all steps.

    A callable object with plain attributes, not a closure: ``LambdaLR.state_dict`` saves its attributes,
    so a resumed run gets the offset :meth:`restart_at` set when the warm-up ended."""

    def __init__(self, warmup_steps: int, total_steps: int, offset: int, own_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.offset, self.own_steps = offset, own_steps

    def restart_at(self, offset: int, own_steps: int) -> None:
        """Start from global step ``offset`` (where the shared warm-up really ended) for ``own_steps``."""
        self.offset, self.own_steps = offset, max(1, own_steps)

    def __call__(self, step: int) -> float:
        scale = (self.total_steps - self.offset) / max(1, self.own_steps) if self.offset else 1.0
        return warmup_cosine_factor(self.offset + step * scale, self.warmup_steps, self.total_steps)
