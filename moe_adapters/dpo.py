"""Preference tuning: ``moea train MIXTURE --dpo PREFS --from NAME@prod --out RUN``.

Continues a registered expert version's LoRA with TRL's ``DPOTrainer``. The reference is that starting
version, frozen: the version's adapter is loaded as the trainable ``default`` adapter of a PEFT model and
TRL copies it into a second, frozen adapter ``ref`` (``DPOTrainer`` does this for a PEFT model with a
pretrained adapter and no ``ref_model``), so the reference is the starting version, not the bare base.

Everything is checked before anything is written: the mixture (its ``dpo:`` section), the preference
file(s) (:func:`moe_adapters.preferences.read_preferences`, line-numbered errors), the ``--from`` ref
(through the registry), the base model (same weights as the version's) and every pair's length. Prompts
are rendered by :mod:`moe_adapters.dpo_data` with the version's system prompt and prompt policy, as
training, ``moea eval`` and the gateway render them.

The run dir is an ordinary one with one expert (``experts/NAME``, ``metrics.json``, ``mixture.yaml``,
``run.json`` last); ``run.json``'s ``lineage`` records the parent version and the preference file's
sha256, which ``moea register`` stores with the new version.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moe_adapters.base_model import base_model_sha256, resolve_base_model
from moe_adapters.config import MixtureConfig
from moe_adapters.config_load import load_mixture, mixture_yaml
from moe_adapters.dpo_data import PairTokens, tokenize_pairs
from moe_adapters.dpo_eval import (
    greedy_probe,
    greedy_win_rate,
    heldout_line,
    preference_accuracy,
    score_pairs,
)
from moe_adapters.dpo_resume import (
    DPO_CHECKPOINTS,
    check_dpo_out_dir,
    claim_run_dir,
    dpo_identity,
    load_trained_adapter,
    remove_resume_state,
)
from moe_adapters.hardware import apply_num_threads, pick_device
from moe_adapters.preferences import preference_file_sha256, read_preferences
from moe_adapters.prompting import version_prompt_spec
from moe_adapters.quantize import check_quantize_backend, load_training_base
from moe_adapters.run_dir import RUN_MARKER, fsync_tree, write_json_atomic
from moe_adapters.train import _load_tokenizer
from moe_adapters.train_outputs import run_header, write_adapter_folder
from moe_adapters.train_state import TrainError

LINEAGE_METHOD = "dpo"
"""``run.json`` ``lineage[NAME].method`` of a DPO-trained expert."""

VLLM_LOG_LEVEL = "VLLM_LOGGING_LEVEL"
"""The variable trl sets on import (see _import_trl)."""


class DpoError(TrainError):
    """A DPO run cannot start (bad --from version, base mismatch); one line, nothing written."""


def train_dpo(
    mixture_path: Path,
    out_dir: Path,
    preferences_path: Path,
    from_ref: str,
    *,
    heldout_path: Path | None = None,
    registry_url: str | None = None,
    store_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Train registered version ``from_ref`` with DPO on ``preferences_path`` into run dir ``out_dir``.

    ``heldout_path``: preference pairs never trained on; the run reports their preference accuracy before
    and after (``metrics.json`` ``dpo.heldout``). Settings come from the mixture's ``dpo:`` section and
    ``train.num_threads`` / ``train.seed`` / ``train.gradient_checkpointing`` / ``train.quantize`` (4bit:
    the base is loaded in 4-bit, as in QLoRA SFT; the adapter written is an ordinary one).
    ``resume``: continue from the run dir's latest DPO checkpoint (``train.checkpoint_every`` DPO steps;
    :mod:`moe_adapters.dpo_resume`), only with the inputs the run started with.
    """
    wall_start = time.perf_counter()
    out_dir = Path(out_dir).expanduser().resolve()
    checkpoint = check_dpo_out_dir(out_dir, resume)
    config = load_mixture(mixture_path, overrides)
    pairs = read_preferences(preferences_path)
    preferences_sha256 = preference_file_sha256(preferences_path)  # hashed as read, before training
    heldout = read_preferences(heldout_path) if heldout_path is not None else None
    view, adapter_dir = _resolve_version(from_ref, registry_url, store_dir)
    base_path = resolve_base_model(None if config.base_model == "default" else config.base_model)
    _check_same_base(view, base_path)
    check_quantize_backend(config.train.quantize, pick_device()[0])
    tokenizer = _load_tokenizer(base_path)
    spec = version_prompt_spec(view)
    train_tokens = tokenize_pairs(pairs, tokenizer, spec, config.dpo.max_length)
    heldout_tokens = tokenize_pairs(heldout, tokenizer, spec, config.dpo.max_length) if heldout else None
    identity = dpo_identity(config, view, preferences_sha256, heldout_path)
    # Everything is checked (a resume's inputs last): from here on the run dir is written.
    claim_run_dir(out_dir, identity, resuming=checkpoint is not None)
    mixture_text = mixture_yaml(config)
    (out_dir / "mixture.yaml").write_text(mixture_text)
    apply_num_threads(config.train.num_threads, announce=progress)
    torch.manual_seed(config.train.seed)
    model = load_policy(base_path, adapter_dir, config.train.quantize, config.train.gradient_checkpointing)
    metrics = train_and_measure(
        model, tokenizer, train_tokens, heldout_tokens, config, view.name, progress, out_dir, checkpoint
    )
    write_adapter_folder(model, "default", out_dir / "experts" / view.name, base_path)
    lineage = lineage_record(from_ref, view.version, preferences_path, preferences_sha256, len(train_tokens))
    metrics["dpo"]["lineage"] = lineage
    if metrics["dpo"]["heldout"] is not None:
        metrics["dpo"]["heldout"]["file"] = str(Path(heldout_path or "").resolve())
    metrics["train"]["wall_s"] = time.perf_counter() - wall_start
    write_json_atomic(out_dir / "metrics.json", metrics)
    run = dpo_run_record(view, config, base_path, mixture_text, lineage)
    fsync_tree(out_dir)  # run.json is the completion marker: what it vouches for reaches the disk first
    write_json_atomic(out_dir / RUN_MARKER, run)
    remove_resume_state(out_dir)
    return out_dir


def lineage_record(
    from_ref: str, parent_version: int, preferences_path: Path, preferences_sha256: str, pairs: int
) -> dict[str, Any]:
    """``run.json`` ``lineage[NAME]``: what ``moea register`` records with the new version
    (``registry/lineage.py`` reads it)."""
    return {
        "method": LINEAGE_METHOD,
        "parent": from_ref,
        "parent_version": parent_version,
        "preferences_file": str(Path(preferences_path).resolve()),
        "preferences_sha256": preferences_sha256,
        "pairs": pairs,
    }


def train_and_measure(
    model: Any,
    tokenizer: Any,
    train_tokens: list[PairTokens],
    heldout_tokens: list[PairTokens] | None,
    config: MixtureConfig,
    name: str,
    progress: bool,
    out_dir: Path,
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Run DPO on ``model`` and return the run's metrics.json (held-back accuracy before/after included).

    "Before" is always the starting version's (``model`` holds it until TRL loads ``resume_from``)."""
    before = score_pairs(model, heldout_tokens) if heldout_tokens else None
    before_greedy = greedy_probe(model, tokenizer, heldout_tokens) if heldout_tokens else []
    step_start = time.perf_counter()
    log_history = run_dpo(
        model, tokenizer, train_tokens, config, progress=progress, out_dir=out_dir, resume_from=resume_from
    )
    metrics = dpo_metrics(name, config, log_history, time.perf_counter() - step_start)
    metrics["dpo"]["heldout"] = None
    if heldout_tokens and before is not None:
        after = preference_accuracy(score_pairs(model, heldout_tokens), before, config.dpo.beta)
        after |= greedy_win_rate(tokenizer, heldout_tokens, greedy_probe(model, tokenizer, heldout_tokens))
        before_report = preference_accuracy(before) | greedy_win_rate(
            tokenizer, heldout_tokens, before_greedy
        )
        metrics["dpo"]["heldout"] = {"before": before_report, "after": after}
        metrics["experts"][name]["heldout_reward_accuracy"] = after["reward_accuracy"]  # `registry show`
        if progress:
            print(heldout_line(before_report, after), file=sys.stderr, flush=True)
    return metrics


def _resolve_version(ref: str, registry_url: str | None, store_dir: Path | None) -> tuple[Any, Path]:
    """The registered version ``ref`` names (any form the registry accepts) and its verified folder."""
    from registry.service import Registry

    with Registry(registry_url, store_dir) as registry:
        view = registry.resolve(ref)
        return view, registry.artifact_path(view)


def _check_same_base(view: Any, base_path: str) -> None:
    """The mixture's base model must be the one the version was trained on (same weights' sha256)."""
    recorded = view.base_model_sha256
    if recorded and base_model_sha256(base_path) not in (None, recorded):
        raise DpoError(
            f"{view.ref} was trained on base {view.base_model_name or view.base_model} (sha256 {recorded[:12]}…),"
            f" but the mixture's base_model resolves to {base_path}; set base_model to that base"
        )


def load_policy(
    base_path: str, adapter_dir: Path, quantize: str = "none", gradient_checkpointing: bool = False
) -> Any:
    """The base model (in 4-bit with ``quantize`` 4bit) with the version's adapter as the trainable
    ``default`` adapter."""
    from peft import PeftModel

    device, dtype = pick_device()
    model = load_training_base(base_path, device, dtype, quantize, gradient_checkpointing)
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="default", is_trainable=True)


def _import_trl() -> tuple[Any, Any]:
    """TRL's (DPOConfig, DPOTrainer), imported without its side effect on the environment: importing trl sets
    VLLM_LOGGING_LEVEL=ERROR in os.environ when vLLM is installed, which every vLLM engine started later from
    this process would inherit (its log would lose the INFO lines moea and its users read)."""
    before = os.environ.get(VLLM_LOG_LEVEL)
    from trl import DPOConfig, DPOTrainer

    if before is None:
        os.environ.pop(VLLM_LOG_LEVEL, None)
    else:
        os.environ[VLLM_LOG_LEVEL] = before
    return DPOConfig, DPOTrainer


def run_dpo(
    model: Any,
    tokenizer: Any,
    pairs: list[PairTokens],
    config: MixtureConfig,
    *,
    progress: bool,
    out_dir: Path,
    resume_from: Path | None = None,
) -> list[dict[str, Any]]:
    """Train ``model``'s ``default`` adapter with TRL's DPOTrainer against a frozen copy of itself (``ref``);
    returns TRL's log history (one entry per step). Checkpoints go to ``out_dir/dpo_checkpoints`` every
    ``train.checkpoint_every`` steps (0: none); ``resume_from`` continues one."""
    from datasets import Dataset
    from transformers import PrinterCallback

    DPOConfig, DPOTrainer = _import_trl()

    class PretokenizedDPOTrainer(DPOTrainer):
        """Pairs arrive as token ids made by moea's prompt rule (moe_adapters.dpo_data); TRL's own
        chat-template tokenization must not run again on them."""

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    # TRL's Trainer wants an output_dir: the checkpoints' folder, or (no checkpoints) an empty scratch one
    # (the adapter itself is written by moea).
    with tempfile.TemporaryDirectory(prefix="moea-dpo-") as scratch:
        output_dir = str(out_dir / DPO_CHECKPOINTS) if config.train.checkpoint_every > 0 else scratch
        args = DPOConfig(**dpo_arguments(config, output_dir, model, progress))
        trainer = PretokenizedDPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([p.as_row() for p in pairs]),
            processing_class=tokenizer,
        )
        if "ref" not in model.peft_config:  # the frozen reference must be the starting version
            raise DpoError("TRL did not create the frozen reference adapter 'ref'; check the trl version")
        trainer.remove_callback(PrinterCallback)
        if resume_from is not None:
            load_trained_adapter(model, resume_from)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    model.set_adapter("default")
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def dpo_arguments(config: MixtureConfig, output_dir: str, model: Any, progress: bool) -> dict[str, Any]:
    """TRL ``DPOConfig`` keyword arguments from the mixture's ``dpo:`` and ``train:`` sections."""
    dpo, every = config.dpo, config.train.checkpoint_every
    on_cpu = next(model.parameters()).device.type == "cpu"
    return {
        "output_dir": output_dir,
        "max_steps": dpo.max_steps,
        "per_device_train_batch_size": dpo.batch_size,
        "learning_rate": dpo.lr,
        "beta": dpo.beta,
        # RPO: plain DPO plus a weighted SFT term on the chosen answers (dpo.sft_weight).
        "loss_type": ["sigmoid", "sft"] if dpo.sft_weight > 0 else ["sigmoid"],
        "loss_weights": [1.0, dpo.sft_weight] if dpo.sft_weight > 0 else None,
        "max_length": dpo.max_length,
        "gradient_checkpointing": config.train.gradient_checkpointing,
        "use_cpu": on_cpu,
        "bf16": not on_cpu,
        "seed": config.train.seed,
        "logging_steps": 1,
        "save_strategy": "steps" if every > 0 else "no",
        "save_steps": max(every, 1),
        "save_total_limit": 1,  # the latest checkpoint is all --resume needs
        "report_to": "none",
        "remove_unused_columns": False,
        "disable_tqdm": not progress,
        "dataloader_num_workers": 0,
    }


def dpo_metrics(
    name: str, config: MixtureConfig, log_history: list[dict[str, Any]], train_s: float
) -> dict[str, Any]:
    """metrics.json of a DPO run: the expert's steps and losses, timing, and the ``dpo`` section."""
    last = log_history[-1] if log_history else {}
    tail = log_history[-max(1, min(10, len(log_history))) :]

    def mean(key: str) -> float | None:
        return sum(e.get(key, 0.0) for e in tail) / len(tail) if tail else None

    return {
        "experts": {
            name: {"steps": int(last.get("step", 0)), "final_train_loss": mean("loss"), "method": "dpo"}
        },
        "train": {
            "steps": int(last.get("step", 0)),
            "step_time_s": train_s,
            "torch_threads": torch.get_num_threads(),
        },
        "dpo": {
            "beta": config.dpo.beta,
            "lr": config.dpo.lr,
            "max_steps": config.dpo.max_steps,
            "batch_size": config.dpo.batch_size,
            "max_length": config.dpo.max_length,
            "sft_weight": config.dpo.sft_weight,
            "quantize": config.train.quantize,
            "final_reward_accuracy": mean("rewards/accuracies"),
            "final_reward_margin": mean("rewards/margins"),
            "curve": [
                {k: e[k] for k in ("step", "loss", "rewards/accuracies", "rewards/margins") if k in e}
                for e in log_history
            ],
        },
    }


def dpo_run_record(
    view: Any, config: MixtureConfig, base_path: str, mixture_text: str, lineage: dict[str, Any]
) -> dict[str, Any]:
    """run.json of a DPO run: the version's task record (its prompt settings, unchanged) and the lineage."""
    task = dict((view.config or {}).get("task") or {})
    task.update(kind=view.task_kind, system_prompt=view.system_prompt)
    task.setdefault("prompt_policy", "if-absent")
    return {
        **run_header(config, base_path, hashlib.sha256(mixture_text.encode()).hexdigest()),
        "single_adapter": False,
        "tasks": {view.name: task},
        "lineage": {view.name: lineage},
    }
