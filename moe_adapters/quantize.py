"""QLoRA (``train.quantize: 4bit``): the base model loaded in 4-bit NF4 with bitsandbytes (double
quantization, bf16 compute) and prepared with PEFT's ``prepare_model_for_kbit_training``; the LoRA experts
train in full precision on top of it.

The adapters are ordinary PEFT adapters of the unquantized base: serving, ``moea eval`` and ``moea export``
use the unquantized base model (the small quantization error of training is not carried into serving).
"""

from __future__ import annotations

from typing import Any

import torch

QUANTIZE_4BIT = "4bit"
"""``train.quantize`` value for QLoRA."""


class QuantizeError(RuntimeError):
    """4-bit loading is not possible on this machine; the message says why and what to do."""


def check_quantize_backend(quantize: str, device: torch.device) -> None:
    """Raise a one-line :class:`QuantizeError` unless bitsandbytes can quantize to 4-bit NF4 on ``device``.

    Called right after the mixture is loaded, before data or the model: on CUDA bitsandbytes must import;
    elsewhere (its CPU backend, bitsandbytes >= 0.48) a tiny tensor is quantized and restored as a probe.
    """
    if quantize != QUANTIZE_4BIT:
        return
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as error:
        raise QuantizeError(
            f"train.quantize=4bit needs bitsandbytes ({error}): pip install 'moea[qlora]', or set "
            "train.quantize=none"
        ) from error
    if device.type == "cuda":
        return
    try:
        probe = torch.linspace(-1, 1, 128, dtype=torch.bfloat16, device=device)
        packed, state = bnb_functional.quantize_4bit(probe, quant_type="nf4", compress_statistics=True)
        restored = bnb_functional.dequantize_4bit(packed, state)
    except Exception as error:  # noqa: BLE001 - any backend failure means the same: no 4-bit here
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuantizeError(
            f"train.quantize=4bit: bitsandbytes cannot quantize to 4-bit NF4 on {device.type} here "
            f"({first_line}); train on a CUDA machine or set train.quantize=none"
        ) from error
    if not torch.allclose(restored.float(), probe.float(), atol=0.2):
        raise QuantizeError(
            f"train.quantize=4bit: bitsandbytes' 4-bit NF4 round trip on {device.type} is wrong here; train "
            "on a CUDA machine or set train.quantize=none"
        )


def quantization_config() -> Any:
    """The QLoRA recipe: NF4 weights, double quantization of the scales, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_quantized_base(base_path: str, device: torch.device, gradient_checkpointing: bool) -> Any:
    """The base model in 4-bit on ``device`` (one whole copy per process, as DDP needs), made ready for
    k-bit training (norms and embeddings in fp32, input gradients on, optional gradient checkpointing)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base_path,
        quantization_config=quantization_config(),
        dtype=torch.bfloat16,
        device_map={"": str(device)},
    )
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def load_training_base(
    base_path: str, device: torch.device, dtype: torch.dtype, quantize: str, gradient_checkpointing: bool
) -> Any:
    """The base model to train adapters on (SFT and DPO): in 4-bit with ``quantize`` 4bit (QLoRA, see
    :func:`load_quantized_base`), else in ``dtype``; on ``device``, KV cache off."""
    if quantize == QUANTIZE_4BIT:
        model = load_quantized_base(base_path, device, gradient_checkpointing)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
    model.config.use_cache = False
    return model
