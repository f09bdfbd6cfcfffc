"""LoRA ranks as vLLM sees them: one place for `moea eval`'s offline engine and `moea serve`'s engines.

Torch-free (the serving gateway imports it).
"""

from __future__ import annotations

import json
from pathlib import Path

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``--max-lora-rank`` accepts (``vllm.config.lora.MaxLoRARanks``, vLLM 0.32)."""
DEFAULT_RANK = 8
"""Rank assumed where an adapter config names none (the mixture default)."""


class LoraRankError(ValueError):
    """An adapter's rank cannot be read, or no rank vLLM accepts holds it."""


def adapter_rank(folder: str | Path) -> int:
    """Largest LoRA rank of the PEFT adapter in `folder`: ``r``, or a larger ``rank_pattern`` entry."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
        return max(
            [int(config.get("r", DEFAULT_RANK)), *map(int, (config.get("rank_pattern") or {}).values())]
        )
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise LoraRankError(f"cannot read the LoRA rank from {path}: {error}") from error


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is >= `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise LoraRankError(f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")
