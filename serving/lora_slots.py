"""How many LoRA slots and which rank vLLM needs for the adapters the gateway serves.

`moea serve` sizes vLLM's ``--max-loras``, ``--max-cpu-loras`` and ``--max-lora-rank`` from what the
registry serves at start (:func:`size_lora_flags`) and refuses flags set too small; the gateway warns
when the registry later grows past them (:func:`shortfalls` against the running engine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from moe_adapters import lora_ranks
from moe_adapters.lora_ranks import DEFAULT_RANK, VLLM_LORA_RANKS

from .vllm_process import EngineError

PINNED_HEADROOM = 2
"""Host-memory slots (``--max-cpu-loras``) beyond the served set, for pinned versions (``name@1``) and new
experts: they cost host memory only, while every ``--max-loras`` slot adds work to mixed batches on CPU."""


class LoraSlotError(EngineError):
    """The LoRA flags cannot hold the adapters to serve; the message names the flag and the value needed."""


@dataclass(frozen=True)
class LoraNeeds:
    """What the served adapters need from vLLM."""

    adapters: int
    """Adapters every engine keeps loaded (serving versions, experiment arms and shadows, base@0)."""
    rank: int
    """Smallest ``--max-lora-rank`` vLLM accepts that holds every one of them."""


@dataclass(frozen=True)
class LoraFlags:
    """vLLM LoRA flags for an engine."""

    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int


@dataclass(frozen=True)
class Shortfall:
    """One flag below what the served adapters need."""

    flag: str
    have: int
    need: int


def adapter_rank(folder: str | Path) -> int:
    """Largest LoRA rank of the PEFT adapter in `folder` (:func:`moe_adapters.lora_ranks.adapter_rank`)."""
    try:
        return lora_ranks.adapter_rank(folder)
    except lora_ranks.LoraRankError as error:
        raise LoraSlotError(str(error)) from error


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that is >= `rank` (:func:`moe_adapters.lora_ranks.vllm_rank`)."""
    try:
        return lora_ranks.vllm_rank(rank)
    except lora_ranks.LoraRankError as error:
        raise LoraSlotError(str(error)) from error


def lora_needs(adapters: Mapping[str, str | Path]) -> LoraNeeds:
    """Needs of `adapters` (vLLM name → PEFT folder), as the gateway loads them."""
    ranks = [adapter_rank(folder) for folder in set(map(str, adapters.values()))]
    return LoraNeeds(adapters=len(adapters), rank=vllm_rank(max(ranks, default=DEFAULT_RANK)))


def shortfalls(
    needs: LoraNeeds, *, max_loras: int | None, max_cpu_loras: int | None, max_lora_rank: int | None
) -> list[Shortfall]:
    """The flags (None: not set / not known) below `needs`."""
    checks = [
        ("--max-loras", max_loras, needs.adapters),
        ("--max-cpu-loras", max_cpu_loras, needs.adapters),
        ("--max-lora-rank", max_lora_rank, needs.rank),
    ]
    return [Shortfall(flag, have, need) for flag, have, need in checks if have is not None and have < need]


def size_lora_flags(
    needs: LoraNeeds, *, max_loras: int | None, max_cpu_loras: int | None, max_lora_rank: int | None
) -> LoraFlags:
    """Flags for an engine serving `needs`: the ones given (None: not set) are checked, the others sized.

    Raises :class:`LoraSlotError` (one line, naming each flag and the value needed) when a given flag is
    too small or not a rank vLLM accepts.
    """
    problems = [
        f"{s.flag} {s.have} is too small: pass {s.flag} {s.need} or more, or leave it unset"
        for s in shortfalls(
            needs, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank
        )
    ]
    if max_lora_rank is not None and max_lora_rank not in VLLM_LORA_RANKS and max_lora_rank >= needs.rank:
        problems.append(
            f"--max-lora-rank {max_lora_rank} is not a rank vLLM accepts: pass {vllm_rank(max_lora_rank)}"
        )
    if max_loras is not None and max_cpu_loras is not None and max_cpu_loras < max_loras:
        problems.append(
            f"--max-cpu-loras {max_cpu_loras} is below --max-loras {max_loras} (vLLM refuses that)"
        )
    if problems:
        served = f"{needs.adapters} adapters of LoRA rank up to {needs.rank} are served at start"
        raise LoraSlotError(f"{served} (serving versions, experiment arms, base@0): " + "; ".join(problems))
    slots = max_loras or max(1, needs.adapters)
    if max_cpu_loras is not None:
        slots = min(slots, max_cpu_loras)  # only lowers an unset --max-loras: a given one was checked above
    return LoraFlags(
        max_loras=slots,
        max_cpu_loras=max_cpu_loras or slots + PINNED_HEADROOM,
        max_lora_rank=max_lora_rank or needs.rank,
    )


def growth_warning(short: list[Shortfall], needs: LoraNeeds) -> str | None:
    """A log line for adapters registered while serving that no longer fit the running engine."""
    if not short:
        return None
    effects = {
        "--max-loras": "a batch mixes at most {have} of them, requests for the others wait",
        "--max-cpu-loras": "adapters beyond {have} are evicted and reloaded from disk",
        "--max-lora-rank": "vLLM refuses adapters of rank above {have}",
    }
    parts = [f"{s.flag} {s.have} < {s.need} ({effects[s.flag].format(have=s.have)})" for s in short]
    return (
        f"the registry now serves {needs.adapters} adapters of LoRA rank up to {needs.rank}, beyond the "
        f"running engine's LoRA slots: {'; '.join(parts)}. Restart `moea serve` to size them again"
    )
