"""Resuming a DPO run: ``moea train MIXTURE --dpo PREFS --from NAME@prod --out RUN --resume``.

TRL's ``DPOTrainer`` is a Hugging Face ``Trainer``: every ``train.checkpoint_every`` DPO steps it writes a
checkpoint (the trainable adapter, AdamW state, LR schedule, RNG states, position in the data) under
``RUN/dpo_checkpoints/checkpoint-N``, keeping only the latest. A run killed after one continues from it
with ``--resume`` and ends with the same adapter as an uninterrupted run. It continues only what it was:
``RUN/dpo_resume.json``, written before the first step, records what the run depends on (the resolved
mixture without ``train.num_threads``, the starting version's number and sha256, the preference and
held-back files' sha256); a resume whose inputs differ is refused with the differences named (``--from
NAME@prod`` after ``prod`` moved resolves to another version, so it is refused too). Both are removed once
``run.json`` is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from moe_adapters.checkpoint import portable_mixture_yaml, refuse_finished
from moe_adapters.config import MixtureConfig
from moe_adapters.preferences import preference_file_sha256
from moe_adapters.run_dir import RUN_MARKER, write_json_atomic
from moe_adapters.train_state import TrainError

DPO_CHECKPOINTS = "dpo_checkpoints"
"""Folder of a DPO run dir that holds TRL's (Hugging Face Trainer's) checkpoints."""

DPO_IDENTITY = "dpo_resume.json"
"""What a DPO checkpoint may be resumed with (:func:`dpo_identity`)."""


def dpo_identity(
    config: MixtureConfig, view: Any, preferences_sha256: str, heldout_path: Path | None
) -> dict[str, Any]:
    """Everything a DPO run's result depends on, except the thread count (a run may resume elsewhere)."""
    return {
        "mixture_sha256": hashlib.sha256(portable_mixture_yaml(config).encode()).hexdigest(),
        "from_version": view.ref,
        "from_sha256": view.sha256,
        "preferences_sha256": preferences_sha256,
        "heldout_sha256": preference_file_sha256(heldout_path) if heldout_path is not None else None,
    }


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The highest-numbered complete checkpoint (``trainer_state.json`` is written last), or None."""
    folder = Path(out_dir) / DPO_CHECKPOINTS
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return max(found)[1] if found else None


def check_dpo_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """Refuse what would lose or silently redo work (as ``moe_adapters.checkpoint.check_out_dir`` does for
    SFT runs); return the checkpoint to continue from (``resume`` only), else None."""
    if (out_dir / RUN_MARKER).is_file():
        refuse_finished(out_dir, resume)
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None and not resume:
        raise TrainError(
            f"{out_dir} already holds a DPO run stopped at {checkpoint.relative_to(out_dir)}: "
            "pass --resume to continue it, or choose a new --out"
        )
    if resume and checkpoint is None:
        print(f"resume: no DPO checkpoint in {out_dir}: starting from step 0", file=sys.stderr)
    return checkpoint


def check_identity(out_dir: Path, identity: dict[str, Any]) -> None:
    """A resume must have the inputs the run started with; name the ones that differ."""
    path = out_dir / DPO_IDENTITY
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(
            f"{path}: cannot read what the checkpoint was written for ({exc}); start a new --out"
        ) from exc
    differ = [key for key in identity if saved.get(key) != identity[key]]
    if differ:
        detail = ", ".join(f"{key} {saved.get(key)!r} -> {identity[key]!r}" for key in differ)
        raise TrainError(
            f"{out_dir} was started with other inputs ({detail}): resume with the same mixture, --from "
            "version and preference files, or start a new --out (nothing was changed)"
        )


def claim_run_dir(out_dir: Path, identity: dict[str, Any], *, resuming: bool) -> None:
    """Check a resume's inputs (:func:`check_identity`), then create the run dir and record them."""
    if resuming:
        check_identity(out_dir, identity)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / DPO_IDENTITY, identity)


def remove_resume_state(out_dir: Path) -> None:
    """After ``run.json``: the checkpoints and their identity are no longer needed."""
    shutil.rmtree(out_dir / DPO_CHECKPOINTS, ignore_errors=True)
    (out_dir / DPO_IDENTITY).unlink(missing_ok=True)


def load_trained_adapter(model: Any, checkpoint: Path) -> None:
    """Put the checkpoint's trained weights into ``model``'s ``default`` adapter.

    Called after TRL has made the frozen ``ref`` copy of the starting version, before ``train()``. The
    Trainer's own resume does not do it: PEFT saves the ``default`` adapter at the checkpoint's root and
    ``ref`` in a subfolder, and ``Trainer._load_from_checkpoint`` (transformers 5) loads only the subfolder
    adapters when there are any, so a resumed run would continue from the starting weights with the
    restored optimizer state (shown by the resume test: the adapters differed by ~1e-3).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = checkpoint / "adapter_model.safetensors"
    if not weights.is_file():
        raise TrainError(f"{checkpoint}: no adapter_model.safetensors; start a new --out")
    result = set_peft_model_state_dict(model, load_file(weights), adapter_name="default")
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise TrainError(
            f"{weights}: {len(unexpected)} weights do not fit the adapter (e.g. {unexpected[0]})"
        )
