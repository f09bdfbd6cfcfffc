"""Builders for registry tests: run dirs in the format_version 1 layout with small fake adapter files, and
request-log records.

The registry treats artifacts as bytes, so the adapter weights here are random bytes of a realistic
shape (a JSON config + a weights file), not a trained LoRA.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from registry.views import RequestRecord


def make_run_dir(
    root: Path,
    tasks: tuple[str, ...] = ("summarize", "classify"),
    *,
    router: bool = True,
    seed: int = 0,
    weights_bytes: int = 4096,
    loss: float = 1.0,
) -> Path:
    """Write a run dir with one adapter folder per task (+ router) under `root`; returns it."""
    root.mkdir(parents=True, exist_ok=True)
    experts = root / "experts"
    for index, task in enumerate(tasks):
        folder = experts / task
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "SmolLM2-135M-Instruct",
            "seed": seed,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "adapter_model.safetensors").write_bytes(
            os.urandom(weights_bytes) if seed < 0 else bytes([(seed + index) % 256]) * weights_bytes
        )
    run = {
        "format_version": 1,
        "base_model": "/models/smollm2",
        "base_model_name": "SmolLM2-135M-Instruct",
        "base_model_sha256": "ab" * 32,
        "created_at": "2026-05-20T00:00:00+00:00",
        "mixture_sha256": "cd" * 32,
        "git_commit": "0123456789abcdef",
        "tasks": {t: {"kind": "generation", "system_prompt": f"You {t}."} for t in tasks},
    }
    (root / "run.json").write_text(json.dumps(run))
    metrics = {
        "experts": {
            t: {
                "steps": 10 + seed,
                "best_val_loss": loss + i / 10,
                "final_train_loss": loss,
                "stopped_early": False,
                "train_tokens": 1000,
                "tokens_per_s": 50.0,
            }
            for i, t in enumerate(tasks)
        },
        "router": {"val_accuracy": 0.9},
        "train": {"tokens_per_s": 50.0, "wall_s": 3.0},
    }
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "mixture.yaml").write_text("tasks: []\n")
    if router:
        router_dir = root / "router"
        router_dir.mkdir(exist_ok=True)
        (router_dir / "router.json").write_text(
            json.dumps(
                {
                    "format_version": 1,
                    "kind": "linear-head",
                    "encoder": "minilm",
                    "encoder_kind": "minilm",
                    "labels": list(tasks),
                    "threshold": 0.5,
                    "metrics": {"val_accuracy": 0.9},
                }
            )
        )
        (router_dir / "head.safetensors").write_bytes(bytes([seed % 256]) * 512)
    return root


def make_request(
    request_id: str, experiment_id: int | None, version: int | None = 1, shadow: bool = False
) -> RequestRecord:
    """A request-log record of user u1 for `summarize@version` (200, 12.5 ms)."""
    return RequestRecord(
        request_id=request_id,
        created_at=datetime.now(UTC),
        expert="summarize",
        version=version,
        experiment_id=experiment_id,
        user="u1",
        routed=True,
        latency_ms=12.5,
        prompt_tokens=5,
        completion_tokens=7,
        status_code=200,
        shadow=shadow,
    )
