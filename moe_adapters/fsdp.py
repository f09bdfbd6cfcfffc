"""FSDP under ``accelerate launch`` with an FSDP config: the frozen base model's decoder layers are sharded
across ranks (PyTorch FSDP2 ``fully_shard``, one unit per decoder layer), the LoRA adapters are not.

Why this shape: every step trains one of many adapters, and the step calls the backbone and the LM head
itself (:func:`moe_adapters.train_step.response_loss`). Sharding each decoder layer works with that: a
layer's weights are gathered by its own forward (and backward) hooks, whichever module the step calls.
The adapters' weights are left out of the shards (``ignored_params``): they are small, every rank keeps a
whole copy, and their gradients are averaged by the same one all-reduce as in a DDP run
(:meth:`moe_adapters.parallel.Parallel.average_gradients`), so checkpoints, resume and the saved adapters
are those of a DDP run and the ranks stay bit-for-bit equal. The embeddings, the final norm and the LM
head stay replicated too (the root module is not wrapped).

Every collective must be entered by every rank: evaluation runs the same number of forwards on each rank
(:func:`equal_forward_counts`), and the end-of-run evaluations (keep-if-better) run on every rank before
rank 0 finishes alone; rank 0 alone runs no forward of the sharded model (the router trains on its own
encoder).

From the accelerate config (``accelerate launch`` exports it as ``FSDP_*`` variables): the sharding
strategy (``FULL_SHARD``: weights re-sharded after each layer's forward; ``SHARD_GRAD_OP``: kept gathered
until the backward) and ``fsdp_reshard_after_forward``. Refused with one line: parameter offload,
``NO_SHARD`` / hybrid strategies, FSDP's activation checkpointing (use ``train.gradient_checkpointing``)
and ``train.quantize: 4bit``. ``fsdp_cpu_ram_efficient_loading`` (transformers then reads the weights on
rank 0 only) is honoured by sending them to the other ranks (:func:`broadcast_rank0_weights`). Wrap policy,
state-dict type, prefetch and the other settings are not needed by this scheme and are ignored. Each rank
still holds the whole base before sharding it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

USE_FSDP_ENV = "ACCELERATE_USE_FSDP"
"""Set to ``true`` by ``accelerate launch`` for a config with ``distributed_type: FSDP``."""

_RESHARD = {"1": True, "FULL_SHARD": True, "2": False, "SHARD_GRAD_OP": False}
"""FSDP sharding strategies this scheme implements (accelerate writes the name or FSDP1's number)."""


class FsdpError(RuntimeError):
    """The FSDP setup asks for something moea's FSDP does not do; the message says what to use."""


@dataclass(frozen=True)
class FsdpSettings:
    """What moea takes from an accelerate FSDP config."""

    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (FULL_SHARD) or keep them for the backward."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def fsdp_settings_from_env() -> FsdpSettings | None:
    """The FSDP settings of this launch (None: not an FSDP launch); raise FsdpError for what is refused."""
    if not _flag(USE_FSDP_ENV):
        return None
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if strategy not in _RESHARD:
        raise FsdpError(
            f"FSDP sharding strategy {strategy}: moea shards with FULL_SHARD or SHARD_GRAD_OP (for NO_SHARD "
            "use a plain multi-process accelerate config: DDP)"
        )
    if _flag("FSDP_OFFLOAD_PARAMS"):
        raise FsdpError(
            "FSDP parameter offload is not supported by moea train: set fsdp_offload_params: false"
        )
    if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise FsdpError(
            "FSDP activation checkpointing: set fsdp_activation_checkpointing: false and use "
            "--set train.gradient_checkpointing=true (the same recomputation, done by the model)"
        )
    reshard = _RESHARD[strategy]
    if "FSDP_RESHARD_AFTER_FORWARD" in os.environ and os.environ.get("FSDP_VERSION", "1") == "2":
        reshard = _flag("FSDP_RESHARD_AFTER_FORWARD")
    return FsdpSettings(reshard_after_forward=reshard)


def broadcast_rank0_weights(model: Any) -> bool:
    """With ``fsdp_cpu_ram_efficient_loading`` (accelerate's default), transformers loads the weights on
    rank 0 only and gives the other ranks zeros, expecting them to be sent from rank 0: send them (every
    parameter and buffer). Returns whether it did. Without this the other ranks trained on a zeroed base
    (found by the FSDP test: validation loss 14 instead of 2.5)."""
    if not _flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        return False
    import torch.distributed as dist

    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
    return True


def decoder_layers(peft_model: Any) -> list[Any]:
    """The base model's decoder layers: the modules whose class the model lists in ``_no_split_modules``
    (what transformers keeps whole on one device; accelerate's default FSDP wrap policy uses the same)."""
    causal_lm = peft_model.base_model.model
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    layers = [m for m in causal_lm.modules() if type(m).__name__ in names]
    if not layers:
        raise FsdpError(
            f"{type(causal_lm).__name__} names no decoder layer class (_no_split_modules): FSDP cannot wrap it"
        )
    return layers


def shard_base(peft_model: Any, settings: FsdpSettings, device: Any, world_size: int) -> int:
    """Shard every decoder layer's frozen weights across the ranks (adapters excluded); return the number of
    sharded layers. Call after every adapter is added and before the first forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(getattr(device, "type", str(device)), (world_size,))
    layers = decoder_layers(peft_model)
    for layer in layers:
        adapters = {p for name, p in layer.named_parameters() if "lora_" in name}
        fully_shard(
            layer, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, ignored_params=adapters
        )
    return len(layers)


def equal_forward_counts(batches: int, parallel: Any) -> int:
    """The number of forwards every rank runs when ranks hold ``batches`` batches each (the largest)."""
    counts = parallel.gather_objects(batches)
    return max(counts)
