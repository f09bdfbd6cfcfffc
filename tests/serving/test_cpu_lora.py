"""moea's CPU multi-LoRA kernel (serving/cpu_lora.py) against a per-token reference, and the plugin switch.

The engine-level checks (a base request batched with LoRA requests is unaffected; LoRA outputs equal
vLLM's own) are in test_gateway.py, with a real vLLM engine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from serving.cpu_lora import ENV_SWITCH, INSTALLED_MESSAGE, StepPlan, apply_lora

SLOTS, RANK, HIDDEN = 4, 8, 32
SLICES = (32, 16, 16)  # like q, k, v of a grouped-query attention layer


def _weights(seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Stacked weights shaped like vLLM's: A [slots, 1, r, in], B [slots, 1, out, r], bf16."""
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g).to(torch.bfloat16) for _ in SLICES)
    b = tuple(torch.randn(SLOTS, 1, size, RANK, generator=g).to(torch.bfloat16) for size in SLICES)
    return a, b


def _reference(y, x, indices, a, b, scale):  # type: ignore[no-untyped-def]
    """Token by token: y_t[slice] += B[slot] (A[slot] x_t · scale), nothing for slot -1."""
    out = y.clone()
    for t, slot in enumerate(indices.tolist()):
        if slot < 0:
            continue
        offset = 0
        for a_i, b_i, size in zip(a, b, SLICES, strict=True):
            shrunk = (x[t].float() @ a_i[slot, 0].float().T) * scale
            out[t, offset : offset + size] += (shrunk.to(y.dtype) @ b_i[slot, 0].to(y.dtype).T)[:size]
            offset += size
    return out


@pytest.mark.parametrize(
    "indices",
    [
        [-1, -1, -1],  # base only
        [2, 2, 2, 2],  # one adapter
        [0, 1, 2, 3, 0, 1],  # every slot, decode-like
        [-1, 3, -1, 0, 0, 3],  # base rows mixed with adapter rows (vLLM's CPU ops apply slot 3 here)
        [3, -1],  # the last slot next to a base row
    ],
)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_apply_lora_matches_the_per_token_reference(indices: list[int], scale: float) -> None:
    a, b = _weights(0)
    idx = torch.tensor(indices)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(indices), HIDDEN, generator=g).to(torch.bfloat16)
    y = torch.randn(len(indices), sum(SLICES), generator=g).to(torch.bfloat16)
    expected = _reference(y, x, idx, a, b, scale)
    got = y.clone()
    apply_lora(StepPlan(idx), got, x, a, b, scale, SLICES)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    base_rows = idx < 0
    assert torch.equal(got[base_rows], y[base_rows]), "rows without a LoRA must be left exactly as they were"


def test_plan_kinds() -> None:
    assert StepPlan(torch.tensor([-1, -1])).kind == "none"
    assert StepPlan(torch.tensor([], dtype=torch.long)).kind == "none"
    single = StepPlan(torch.tensor([1, 1, 1]))
    assert (single.kind, single.slot) == ("single", 1)
    mixed = StepPlan(torch.tensor([-1, 0, 3]))
    assert mixed.kind == "mixed" and mixed.slots_used == {0, 3}
    assert mixed.mask(SLOTS).squeeze(-1).tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]


def _installed_class(switch: str | None) -> str:
    """Name of vLLM's CPU punica wrapper after the plugins ran, in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != ENV_SWITCH}
    if switch is not None:
        env[ENV_SWITCH] = switch
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "from vllm.lora.punica_wrapper import punica_cpu; print(punica_cpu.PunicaWrapperCPU.__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_plugin_is_installed_only_when_switched_on() -> None:
    assert _installed_class("1") == "MoeaPunicaWrapperCPU"
    assert _installed_class(None) == "PunicaWrapperCPU"
    assert _installed_class("0") == "PunicaWrapperCPU"


@pytest.mark.xfail(
    strict=True,
    reason="vLLM 0.32's CPU LoRA ops index the stacked weights with -1 for base tokens, i.e. the last slot; "
    "if this passes, vLLM fixed it",
)
def test_vllm_own_cpu_ops_leave_base_rows_alone() -> None:
    """The root cause of the base-row leak that moea's kernel fixes, on vLLM's own ops."""
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink

    a, b = _weights(0)
    idx = torch.tensor([3, -1])
    x = torch.randn(2, HIDDEN).to(torch.bfloat16)
    y = torch.zeros(2, SLICES[0], dtype=torch.bfloat16)
    shrunk = torch.zeros(2, RANK, dtype=torch.float32)
    bgmv_shrink(x, a[0], shrunk, idx, 1.0)
    bgmv_expand(shrunk, b[0], y, idx, add_inputs=True)
    assert torch.count_nonzero(y[1]) == 0, "the base row (index -1) got a LoRA applied"


# ------------------------------------------------------------------------------ with real engines


@pytest.fixture(scope="module")
def stock_and_kernel_engines(serving_assets, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Two vLLM engines with the same two LoRAs loaded: vLLM's own CPU ops and moea's kernel."""
    import asyncio

    import httpx

    from moe_adapters.base_model import DEFAULT_BASE_NAME
    from serving.vllm_process import EngineSettings, VLLMProcess

    logs = tmp_path_factory.mktemp("cpu-lora-engines")
    engines = [
        VLLMProcess(
            EngineSettings(
                model=serving_assets.base,
                served_name=DEFAULT_BASE_NAME,
                max_loras=2,
                cpu_lora_kernel=kernel,
                log_path=logs / f"kernel-{kernel}.log",
            )
        )  # fmt: skip
        for kernel in (False, True)
    ]
    for engine in engines:
        engine.start()

    async def ready() -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(engine.wait_healthy(client) for engine in engines))
            for engine in engines:
                for task in ("math", "sentiment"):
                    body = {"lora_name": task, "lora_path": str(serving_assets.run1 / "experts" / task)}
                    (await client.post(f"{engine.url}/v1/load_lora_adapter", json=body)).raise_for_status()

    try:
        asyncio.run(ready())
        stock_log, kernel_log = (engine.log_path.read_text() for engine in engines)
        assert INSTALLED_MESSAGE in kernel_log and INSTALLED_MESSAGE not in stock_log
        yield [engine.url for engine in engines]
    finally:
        for engine in engines:
            engine.stop()


def _complete(url: str, model: str, prompt: str) -> str:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0.0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def test_kernel_engine_answers_like_vllm_own_ops(stock_and_kernel_engines: list[str]) -> None:
    """One request at a time (no mixed batches), LoRA and base answers match vLLM's own CPU ops.

    One greedy near-tie flip of 10 is allowed: the kernel sums in a different order (bf16)."""
    stock, kernel = stock_and_kernel_engines
    from moe_adapters.base_model import DEFAULT_BASE_NAME

    prompts = ["The capital of France is", "Tom has 3 apples and buys 4 more.", "I loved this phone because",
               "Once upon a time", "2 + 2 ="]  # fmt: skip
    jobs = [(model, p) for model in ("math", "sentiment") for p in prompts]
    differ = [job for job in jobs if _complete(stock, *job) != _complete(kernel, *job)]
    assert len(differ) <= 1, differ
    base = [(DEFAULT_BASE_NAME, p) for p in prompts]
    assert [_complete(stock, *job) for job in base] == [_complete(kernel, *job) for job in base]
    lora_changes = sum(
        _complete(kernel, *job) != _complete(kernel, DEFAULT_BASE_NAME, job[1]) for job in jobs
    )
    assert lora_changes >= 5, "the fixture LoRAs should change most answers (else this test shows nothing)"


def test_cached_matrices_follow_slot_writes() -> None:
    """With the slot record on (as in an engine), the stacked matrices are cached and a write to a slot
    (what vLLM's set_lora/reset_lora do, through the recording wrappers) drops the cache."""
    from types import SimpleNamespace

    from serving.cpu_lora import CACHE_ATTRIBUTE, _after, _loaded_slots

    a, b = _weights(0)
    layer = SimpleNamespace(lora_a_stacked=a, lora_b_stacked=b)
    set_lora = _after(lambda self, index, weights: self.lora_a_stacked[0][index].copy_(weights),
                      lambda self, index: _loaded_slots(self).add(index))  # fmt: skip
    set_lora(layer, 1, torch.ones(1, RANK, HIDDEN))
    idx = torch.tensor([1, -1, 1])
    x = torch.randn(3, HIDDEN).to(torch.bfloat16)
    y = torch.zeros(3, sum(SLICES), dtype=torch.bfloat16)
    for _ in range(2):  # second call: from the cache
        got = y.clone()
        apply_lora(StepPlan(idx), got, x, a, b, 1.0, SLICES)
        torch.testing.assert_close(
            got.float(), _reference(y, x, idx, a, b, 1.0).float(), rtol=2e-2, atol=2e-2
        )
        assert getattr(a[0], CACHE_ATTRIBUTE) is not None
    set_lora(layer, 1, torch.full((1, RANK, HIDDEN), -2.0))
    assert getattr(a[0], CACHE_ATTRIBUTE) is None
    got = y.clone()
    apply_lora(StepPlan(torch.tensor([1, 0, -1])), got, x, a, b, 1.0, SLICES)
    expected = _reference(y, x, torch.tensor([1, 0, -1]), a, b, 1.0)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
