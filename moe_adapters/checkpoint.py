"""Checkpoints and resume: what a run dir allows (refuse, resume or start), and every piece of training
state written atomically and restored so that ``resume=True`` continues bit-for-bit."""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from moe_adapters.config import SHARED_ADAPTER, MixtureConfig
from moe_adapters.config_load import mixture_yaml
from moe_adapters.run_dir import CHECKPOINT_NAME, RUN_MARKER, RunDirState, run_dir_state
from moe_adapters.shared_phase import set_phase
from moe_adapters.train_state import Trainer, TrainError
from moe_adapters.train_step import flush_losses

CHECKPOINT_FORMAT_VERSION = 1
"""checkpoint.pt ``format_version``."""


def check_out_dir(out_dir: Path, resume: bool) -> RunDirState:
    """Refuse what would lose or silently redo work, before anything is loaded; return the state.

    A finished run is never trained over (with or without ``resume``: retraining it from step 0 would
    overwrite it); a checkpoint is only continued with ``resume``. ``resume`` without a checkpoint starts
    fresh, like PyTorch Lightning's ``ckpt_path="last"``, so a job script can always pass ``--resume``.
    """
    state = run_dir_state(out_dir)
    if state == "finished":
        refuse_finished(out_dir, resume)
    if state == "resumable" and not resume:
        raise TrainError(
            f"{out_dir} already holds a run stopped at a checkpoint ({CHECKPOINT_NAME}): "
            "pass resume=True (--resume) to continue it, or choose a new out dir"
        )
    if resume and state != "resumable":
        print(f"resume: no {CHECKPOINT_NAME} in {out_dir}: starting from step 0", file=sys.stderr)
    return state


def refuse_finished(out_dir: Path, resume: bool) -> None:
    """A finished run (``run.json``) is never trained over, by SFT or DPO; raise the error that says so."""
    action = "--resume has nothing to continue" if resume else "training again would overwrite it"
    raise TrainError(
        f"{out_dir} already holds a finished run ({RUN_MARKER}): {action}; "
        "train into a new --out (nothing was changed)"
    )


def portable_mixture_yaml(config: MixtureConfig, probabilities: dict[str, float] | None = None) -> str:
    """The resolved mixture without the settings that do not change what is trained (``train.num_threads``:
    a run may resume on a machine with other cores): what a resume must match (SFT and DPO)."""
    portable = copy.deepcopy(config)
    portable.train.num_threads = None
    return mixture_yaml(portable, probabilities)


def save_checkpoint(trainer: Trainer, path: Path, identity: str) -> None:
    """Write every piece of training state to ``path`` atomically (temp file + rename).

    In a data-parallel run every rank calls this (each rank's RNG state is gathered: dropout draws differ
    per rank) and rank 0 alone writes; the rest of the state is the same on every rank."""
    from peft import get_peft_model_state_dict

    flush_losses(trainer)
    rng_states = trainer.parallel.gather_objects(torch.get_rng_state())
    if not trainer.parallel.is_main:
        return
    state = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "resume_sha256": identity,
        "global_step": trainer.global_step,
        "train_time_s": trainer.train_time_s,
        "sampler": trainer.sampler.state_dict(),
        "batchers": {t: b.state_dict() for t, b in trainer.batchers.items()},
        "replay_batcher": trainer.replay_batcher.state_dict() if trainer.replay_batcher else None,
        "shared_done": trainer.shared_done,
        "torch_rng": rng_states[0],
        "world_size": trainer.parallel.world_size,
        "torch_rng_per_rank": rng_states,
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


def resume_identity(config: MixtureConfig, probabilities: dict[str, float], single_adapter: bool) -> str:
    """What a checkpoint must match to be resumed: the resolved mixture without the settings that do not
    change what is trained (``train.num_threads``: a run may resume on a machine with other cores)."""
    text = portable_mixture_yaml(config, probabilities)
    return hashlib.sha256(text.encode() + str(single_adapter).encode()).hexdigest()


def read_checkpoint(path: Path, identity: str) -> dict[str, Any]:
    """Load ``path``; refuse a checkpoint written for other settings (resuming it would not be exact).

    ``identity`` is :func:`resume_identity` (older checkpoints carry the run's mixture hash instead: they
    resume only where that equals it, i.e. when they were written without a thread setting)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("resume_sha256", state.get("mixture_sha256")) != identity:
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
    saved_world = state.get("world_size", 1)
    if saved_world != trainer.parallel.world_size:
        raise TrainError(
            f"the checkpoint was written by {saved_world} process(es), this run has "
            f"{trainer.parallel.world_size}: resume with the same number of processes (the batches depend on it)"
        )
    torch.set_rng_state(state.get("torch_rng_per_rank", [state["torch_rng"]])[trainer.parallel.rank])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    trainer.global_step = state["global_step"]
    trainer.train_time_s = state["train_time_s"]
    if SHARED_ADAPTER in trainer.experts:
        set_phase(trainer, shared_done=state["shared_done"])
