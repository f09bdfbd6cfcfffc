"""moea's multi-LoRA kernel for vLLM's CPU backend, installed into the engine as a vLLM plugin.

vLLM's CPU backend applies LoRAs with PyTorch ops (``vllm/lora/ops/torch_ops``): for every linear
layer and output slice it gathers one weight matrix per token (``weights[token_lora_indices]``) and runs
an einsum over them. Two things follow, both measured in moea's tests and ``benchmarks/``:

- **wrong output**: a token without a LoRA has index ``-1``, and ``weights[-1]`` is the *last* LoRA
  slot — a base-model request batched with LoRA requests gets that slot's adapter applied (moea's
  base-LoRA guard works around it by sending base requests through an all-zero LoRA);
- **slow**: ~16 small ops per slice and layer even when the batch has no LoRA request at all.

This wrapper replaces them with a plan computed once per engine step from the token → slot mapping:

- no token uses a LoRA → nothing is done (base-model batches pay nothing for ``--enable-lora``);
- all tokens use the same slot → two plain matmuls with that slot's A and B;
- mixed slots (with or without base tokens) → one matmul against *all* slots' A at once
  (``[tokens, slots × r]``, r is small), a one-hot mask that keeps each token's own slot (base tokens
  get zeros: this is the correctness fix), one matmul with all slots' B.

Numerics follow vLLM's: the shrink runs in float32, the expand in the output dtype.

Installation: ``pyproject.toml`` registers :func:`register` under vLLM's ``vllm.general_plugins``
entry point, which vLLM calls in every engine process. It does nothing unless the environment has
``MOEA_CPU_LORA_KERNEL=1`` (``moea serve`` sets it for the engines it starts on CPU; ``moea serve
--no-cpu-lora-kernel`` leaves vLLM's own ops), the platform is CPU, and the vLLM version is one the
kernel was tested with (:data:`TESTED_VLLM`). Other vLLM programs in the same environment are not
affected.
"""

from __future__ import annotations

import logging
import os
from typing import Any

ENV_SWITCH = "MOEA_CPU_LORA_KERNEL"
"""Environment variable that turns the kernel on in an engine process ("1")."""

TESTED_VLLM = ("0.32.",)
"""vLLM version prefixes whose CPU punica wrapper this kernel replaces (its internals are not an API)."""

INSTALLED_MESSAGE = "moea CPU LoRA kernel installed (replaces vLLM's torch_ops punica wrapper)"
"""Logged by each engine process that uses the kernel (tests look for it in the engine log)."""

log = logging.getLogger("vllm.plugins.moea_cpu_lora")  # a vllm.* logger: lands in the engine log


def register() -> None:
    """vLLM general-plugin entry point: swap in the moea CPU LoRA wrapper when switched on."""
    if os.environ.get(ENV_SWITCH) != "1":
        return
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if not vllm.__version__.startswith(TESTED_VLLM):
        log.warning(
            "moea CPU LoRA kernel not installed: tested with vLLM %s, found %s", TESTED_VLLM, vllm.__version__
        )
        return
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(punica_cpu.PunicaWrapperCPU, "moea_kernel", False):
        return
    punica_cpu.PunicaWrapperCPU = _wrapper_class(punica_cpu.PunicaWrapperCPU)
    log.info(INSTALLED_MESSAGE)


class StepPlan:
    """How to apply LoRAs to the tokens of one engine step (built once per step, used by every layer)."""

    __slots__ = ("tokens", "kind", "slot", "mask")

    def __init__(self, indices: Any, slots: int) -> None:
        import torch

        self.tokens = int(indices.numel())
        self.slot = -1
        self.mask = None
        if self.tokens == 0 or int(indices.max()) < 0:
            self.kind = "none"
            return
        low, high = int(indices.min()), int(indices.max())
        if low == high:
            self.kind, self.slot = "single", high
            return
        self.kind = "mixed"
        mask = torch.zeros(self.tokens, slots, dtype=torch.float32, device=indices.device)
        used = indices >= 0
        rows = torch.arange(self.tokens, device=indices.device)[used]
        mask[rows, indices[used]] = 1.0
        self.mask = mask.unsqueeze(-1)  # [tokens, slots, 1]


def apply_lora(
    plan: StepPlan,
    y: Any,
    x: Any,
    lora_a: tuple[Any, ...],
    lora_b: tuple[Any, ...],
    scale: float,
    output_slices: tuple[int, ...],
) -> None:
    """``y[:, slice_i] += scale · B_slot(t)[i] · A_slot(t)[i] · x_t`` for every token t with a LoRA slot."""
    import torch.nn.functional as F

    if plan.kind == "none":
        return
    x32 = x.float()
    offset = 0
    for a, b, size in zip(lora_a, lora_b, output_slices, strict=True):
        a3, b3 = a.flatten(0, 1) if a.dim() == 4 else a, b.flatten(0, 1) if b.dim() == 4 else b
        if plan.kind == "single":
            shrunk = F.linear(x32, a3[plan.slot].float())
            if scale != 1.0:
                shrunk = shrunk * scale
            delta = F.linear(shrunk.to(y.dtype), b3[plan.slot].to(y.dtype))
        else:
            slots, rank = a3.shape[0], a3.shape[1]
            shrunk = F.linear(x32, a3.reshape(slots * rank, -1).float()).view(-1, slots, rank)
            shrunk = shrunk * (plan.mask if scale == 1.0 else plan.mask * scale)
            b_all = b3.permute(1, 0, 2).reshape(b3.shape[1], slots * rank).to(y.dtype)
            delta = F.linear(shrunk.view(-1, slots * rank).to(y.dtype), b_all)
        y[:, offset : offset + size] += delta[:, :size]
        offset += size


def _wrapper_class(base: type) -> type:
    """A subclass of vLLM's ``PunicaWrapperCPU`` whose linear-layer LoRA path uses :func:`apply_lora`."""

    class MoeaPunicaWrapperCPU(base):  # type: ignore[misc, valid-type]
        moea_kernel = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.moea_plan: StepPlan | None = None
            self.moea_slots = 0

        def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], max_loras: int,
                            vocab_size: int, **kwargs: Any) -> None:  # fmt: skip
            super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
            self.moea_slots = max_loras
            self.moea_plan = StepPlan(self.token_lora_indices, max_loras)

        def add_lora_linear(self, y: Any, x: Any, lora_a_stacked: tuple[Any, ...], lora_b_stacked: tuple[Any, ...],
                            scale: float, output_slices: tuple[int, ...], *, buffer: Any = None,
                            **kwargs: Any) -> None:  # fmt: skip
            plan = self.moea_plan
            x2 = x.view(-1, x.shape[-1])
            y2 = y.view(-1, y.shape[-1])
            if (
                plan is None
                or buffer is not None
                or kwargs.get("add_inputs", True) is False
                or x2.shape[0] != plan.tokens
                or y2.shape[0] != plan.tokens
                or lora_a_stacked[0].shape[0] != self.moea_slots
            ):
                return super().add_lora_linear(
                    y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
                )
            apply_lora(plan, y2, x2, lora_a_stacked, lora_b_stacked, scale, output_slices)
            return None

    MoeaPunicaWrapperCPU.__qualname__ = MoeaPunicaWrapperCPU.__name__
    return MoeaPunicaWrapperCPU
