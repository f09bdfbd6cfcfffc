"""Data-parallel training under ``accelerate launch`` (or ``torchrun``): who this process is, and the few
collectives the training loop needs.

Every rank holds the whole base model and every adapter. The task sampler and the batchers are seeded
alike on every rank, so all ranks draw the same task each step; each step every rank draws ``world_size``
batches from that task's batcher and trains on the one at its own rank (``train.batch_size`` is per
process, as in accelerate and the HF Trainer: the global batch is ``batch_size x world_size``). After the
backward pass the active adapter's gradients (and the loss, for the logs) are averaged across ranks with
one all-reduce: what ``DistributedDataParallel`` does, without wrapping a model that holds many adapters
of which one is trained per step (DDP would need ``find_unused_parameters`` and its forward, which the
response-only loss bypasses). Ranks therefore stay bit-for-bit equal. Only rank 0 writes the run dir.

Under an FSDP accelerate config the base model's decoder layers are sharded across the ranks and the
adapters are not (:mod:`moe_adapters.fsdp`); everything above holds unchanged. DeepSpeed is refused with a
clear error (use FSDP, or QLoRA: ``train.quantize: 4bit``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from moe_adapters.fsdp import FsdpError, FsdpSettings, fsdp_settings_from_env

LAUNCHER_ENV = "WORLD_SIZE"
"""Set by ``accelerate launch`` / ``torchrun`` for each worker process."""
SHARDING_ENVS = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}
"""Launch modes refused (FSDP is handled: moe_adapters.fsdp)."""


class ParallelError(RuntimeError):
    """The launch setup is not supported; the message says what to use instead."""


@dataclass
class Parallel:
    """This process's place in a data-parallel run (the defaults: one process, no collectives)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    """The device accelerate assigned to this rank; None: :func:`moe_adapters.hardware.pick_device`."""
    fsdp: FsdpSettings | None = None
    """Set under an FSDP launch: the base's decoder layers are sharded (:mod:`moe_adapters.fsdp`)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run dir, checkpoints and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1

    def average_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Average the gradients of ``params`` and ``loss`` across ranks in one all-reduce; return the
        averaged loss (``loss`` itself with one process)."""
        if not self.active:
            return loss
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.detach().reshape(1).float()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for param, grad in zip(params, grads, strict=True):
            n = grad.numel()
            param.grad = flat[offset : offset + n].view_as(grad).to(grad.dtype)
            offset += n
        return flat[-1]

    def sum_(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor in place across ranks (no-op with one process)."""
        if self.active:
            import torch.distributed as dist

            for tensor in tensors:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank (``[value]`` with one process)."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        """Wait for every rank (no-op with one process)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def detect_parallel() -> Parallel:
    """The data-parallel setup of this process: one process unless started by a launcher with
    ``WORLD_SIZE > 1``; then the process group is set up through accelerate (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get(LAUNCHER_ENV, "1")) <= 1:
        return Parallel()
    for env, name in SHARDING_ENVS.items():
        if os.environ.get(env, "false").lower() == "true":
            raise ParallelError(
                f"{name} is not supported by moea train: use an FSDP or a plain multi-process (DDP) "
                "accelerate config, or train.quantize=4bit for a base that does not fit"
            )
    try:
        fsdp = fsdp_settings_from_env()
    except FsdpError as error:
        raise ParallelError(str(error)) from error
    from accelerate import PartialState

    cpu = (
        os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")
        or not torch.cuda.is_available()
    )
    state = PartialState(cpu=cpu)
    return Parallel(rank=state.process_index, world_size=state.num_processes, device=state.device, fsdp=fsdp)


TEST_DIGEST_ENV = "MOEA_TEST_ONLY_RANK_DIGESTS"
"""Test-only hook: a folder where every rank writes ``rank<N>.json`` with a digest of each adapter it would
save (see :func:`write_rank_digests`), so a test can check that the ranks ended equal."""


def adapter_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over an adapter's tensors (sorted by key; dtype, shape and bytes), as saved or as held."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
