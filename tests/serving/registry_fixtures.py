"""Run dirs for A/B and request-log tests: the registry treats adapters as bytes, so tiny ones do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def make_run_dir(root: Path, experts: list[str], seed: int) -> Path:
    """A minimal format-1 run dir: one tiny (but valid) safetensors adapter per expert."""
    run_dir = root / f"run-{seed}"
    for name in experts:
        folder = run_dir / "experts" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        save_file(
            {"lora_A": np.full((2, 2), seed, dtype=np.float32)}, str(folder / "adapter_model.safetensors")
        )
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "base_model": "base",
                "base_model_name": "SmolLM2-135M-Instruct",
                "tasks": {name: {"kind": "generation"} for name in experts},
            }
        )
    )
    return run_dir
