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

SLOTS_ATTRIBUTE = "moea_loaded_slots"
"""Attribute set on each LoRA layer's first stacked A tensor: the slots that hold weights for that layer."""

CACHE_ATTRIBUTE = "moea_stacked_matrices"
"""Attribute on the same tensor: (dtype, A of all slots and slices, block-diagonal B), see stacked_matrices."""

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
    _track_loaded_slots()
    log.info(INSTALLED_MESSAGE)


def _loaded_slots(layer: Any) -> set[int]:
    """The layer's slot record (created on first use); any write to a slot also drops the matrix cache."""
    stacked = layer.lora_a_stacked
    stacked = stacked[0] if isinstance(stacked, tuple) else stacked  # linear layers: per slice; lm_head: one
    setattr(stacked, CACHE_ATTRIBUTE, None)
    slots = getattr(stacked, SLOTS_ATTRIBUTE, None)
    if slots is None:
        slots = set()
        setattr(stacked, SLOTS_ATTRIBUTE, slots)
    return slots


def _track_loaded_slots() -> None:
    """Record, per linear LoRA layer, which slots hold an adapter's weights for it.

    vLLM wraps every linear layer for LoRA, but an adapter trained on q/k/v/o has no weights for the MLP:
    vLLM calls ``reset_lora`` there and still runs the zero LoRA on every token. With this record the
    kernel skips layers that no adapter of the batch touches."""
    import vllm.lora.layers  # noqa: F401 - imports every layer class
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    classes, stack = [], [BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA]
    while stack:
        cls = stack.pop()
        classes.append(cls)
        stack.extend(cls.__subclasses__())
    for cls in classes:
        if "reset_lora" in cls.__dict__:
            cls.reset_lora = _after(
                cls.__dict__["reset_lora"], lambda layer, index: _loaded_slots(layer).discard(index)
            )
        if "set_lora" in cls.__dict__:
            cls.set_lora = _after(
                cls.__dict__["set_lora"], lambda layer, index: _loaded_slots(layer).add(index)
            )


def _after(method: Any, record: Any) -> Any:
    import functools

    @functools.wraps(method)
    def wrapped(self: Any, index: int, *args: Any, **kwargs: Any) -> Any:
        result = method(self, index, *args, **kwargs)
        record(self, index)
        return result

    return wrapped


class StepPlan:
    """How to apply LoRAs to the tokens of one engine step (built once per step, used by every layer)."""

    __slots__ = ("tokens", "kind", "slot", "slots_used", "_indices", "_masks")

    def __init__(self, indices: Any) -> None:
        self.tokens = int(indices.numel())
        self.slot = -1
        self.slots_used: frozenset[int] = frozenset()
        self._indices = indices
        self._masks: dict[int, Any] = {}
        if self.tokens == 0 or int(indices.max()) < 0:
            self.kind = "none"
            return
        self.slots_used = frozenset(int(i) for i in indices.unique().tolist() if i >= 0)
        low, high = int(indices.min()), int(indices.max())
        if low == high:
            self.kind, self.slot = "single", high
        else:
            self.kind = "mixed"

    def mask(self, slots: int) -> Any:
        """``[tokens, slots, 1]`` float32 one-hot of each token's slot (all zeros for base tokens)."""
        mask = self._masks.get(slots)
        if mask is None:
            import torch

            indices = self._indices
            mask = torch.zeros(self.tokens, slots, dtype=torch.float32, device=indices.device)
            used = indices >= 0
            rows = torch.arange(self.tokens, device=indices.device)[used]
            mask[rows, indices[used]] = 1.0
            mask = self._masks[slots] = mask.unsqueeze(-1)
        return mask


def stacked_matrices(
    lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], output_slices: tuple[int, ...], dtype: Any
) -> tuple[Any, Any]:
    """All slots and slices of one layer as two matrices: ``A`` float32 ``[slices·slots·r, in]`` and a
    block-diagonal ``B`` ``[Σ slice sizes, slices·slots·r]`` in ``dtype``.

    Cached on the layer's first stacked tensor while the slot record is kept (the cache is dropped
    whenever vLLM writes a slot: ``set_lora`` / ``reset_lora``); rebuilt per call otherwise."""
    import torch

    key = lora_a[0]
    cached = getattr(key, CACHE_ATTRIBUTE, None)
    if cached is not None and cached[0] == dtype:
        return cached[1], cached[2]
    slots, rank, hidden = lora_a[0].shape[0], lora_a[0].shape[-2], lora_a[0].shape[-1]
    width = slots * rank
    a_all = torch.cat([a.reshape(slots * rank, hidden) for a in lora_a]).float()
    b_all = torch.zeros(sum(output_slices), len(lora_b) * width, dtype=dtype, device=key.device)
    row = 0
    for i, (b, size) in enumerate(zip(lora_b, output_slices, strict=True)):
        b3 = b.reshape(slots, b.shape[-2], rank)[:, :size]  # [slots, out, r]
        b_all[row : row + size, i * width : (i + 1) * width] = b3.permute(1, 0, 2).reshape(size, width)
        row += size
    if hasattr(key, SLOTS_ATTRIBUTE):  # writes are tracked: safe to keep
        setattr(key, CACHE_ATTRIBUTE, (dtype, a_all, b_all))
    return a_all, b_all


def apply_lora(
    plan: StepPlan,
    y: Any,
    x: Any,
    lora_a: tuple[Any, ...],
    lora_b: tuple[Any, ...],
    scale: float,
    output_slices: tuple[int, ...],
) -> None:
    """``y[:, slice_i] += scale · B_slot(t)[i] · A_slot(t)[i] · x_t`` for every token t with a LoRA slot.

    Two matmuls per layer whatever the number of slices: the shrink against every slot's A (float32,
    like vLLM), a one-hot mask keeping each token's own slot, the expand against the block-diagonal B."""
    import torch.nn.functional as F

    if plan.kind == "none":
        return
    slices, slots, rank = len(lora_a), lora_a[0].shape[0], lora_a[0].shape[-2]
    a_all, b_all = stacked_matrices(lora_a, lora_b, output_slices, y.dtype)
    width = sum(output_slices)
    tokens = x.shape[0]
    if plan.kind == "single":  # only this slot's rows and columns
        a_one = a_all.view(slices, slots, rank, -1)[:, plan.slot].reshape(slices * rank, -1)
        b_one = b_all.view(width, slices, slots, rank)[:, :, plan.slot].reshape(width, slices * rank)
        shrunk = F.linear(x.float(), a_one)
        if scale != 1.0:
            shrunk = shrunk * scale
        delta = F.linear(shrunk.to(y.dtype), b_one)
    else:
        mask = plan.mask(slots).view(tokens, 1, slots, 1)
        shrunk = F.linear(x.float(), a_all).view(tokens, slices, slots, rank)
        shrunk = shrunk * (mask if scale == 1.0 else mask * scale)
        delta = F.linear(shrunk.view(tokens, -1).to(y.dtype), b_all)
    y[:, :width] += delta


def _wrapper_class(base: type) -> type:
    """A subclass of vLLM's ``PunicaWrapperCPU`` whose linear-layer LoRA path uses :func:`apply_lora`."""

    class MoeaPunicaWrapperCPU(base):  # type: ignore[misc, valid-type]
        moea_kernel = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.moea_plan: StepPlan | None = None

        def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], max_loras: int,
                            vocab_size: int, **kwargs: Any) -> None:  # fmt: skip
            super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
            self.moea_plan = StepPlan(self.token_lora_indices)

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
            ):
                if not getattr(self, "moea_fallback_logged", False):
                    self.moea_fallback_logged = True
                    log.warning(
                        "moea CPU LoRA kernel: a layer call it does not handle went to vLLM's ops "
                        "(plan %s, buffer %s, kwargs %s, x %s, y %s)",
                        None if plan is None else (plan.kind, plan.tokens), buffer is not None,
                        sorted(kwargs), tuple(x2.shape), tuple(y2.shape),
                    )  # fmt: skip
                return super().add_lora_linear(
                    y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
                )
            loaded = getattr(lora_a_stacked[0], SLOTS_ATTRIBUTE, None)
            if loaded is not None and not (plan.slots_used & loaded):
                return None  # no adapter of this batch has weights for this layer (e.g. the MLP of a q/k/v/o LoRA)
            apply_lora(plan, y2, x2, lora_a_stacked, lora_b_stacked, scale, output_slices)
            return None

        def add_lora_logits(self, y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, scale: Any,
                            *, buffer: Any = None, **kwargs: Any) -> Any:  # fmt: skip
            plan = self.moea_plan
            loaded = getattr(lora_a_stacked, SLOTS_ATTRIBUTE, None)
            if plan is not None and (
                plan.kind == "none" or (loaded is not None and not plan.slots_used & loaded)
            ):
                return None  # no adapter of the batch has lm_head weights (the usual case)
            return super().add_lora_logits(
                y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
            )

    MoeaPunicaWrapperCPU.__qualname__ = MoeaPunicaWrapperCPU.__name__
    return MoeaPunicaWrapperCPU
