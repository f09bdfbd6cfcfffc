"""LoRA slot sizing of `moea serve`: the sizing function, what a real registry serves at start, and the
refusal of too-small flags through the CLI before any engine starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from serving.base_lora import BASE_LORA_NAME
from serving.cli import serve_command, served_at_start
from serving.lora_slots import (
    LoraNeeds,
    LoraSlotError,
    Shortfall,
    adapter_rank,
    growth_warning,
    lora_needs,
    size_lora_flags,
)

from .registry_fixtures import make_run_dir

EXPERTS = ["sentiment", "math", "extraction", "dates"]


def _set_rank(run_dir: Path, expert: str, rank: int, pattern: dict[str, int] | None = None) -> None:
    path = run_dir / "experts" / expert / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(r=rank, rank_pattern=pattern or {})
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # nothing given: sized to the served set, host memory with room for pinned versions
        ({}, (5, 7, 8)),
        # enough given: kept as given
        ({"max_loras": 6, "max_cpu_loras": 9, "max_lora_rank": 16}, (6, 9, 16)),
        # only --max-cpu-loras given: --max-loras sized, never above it
        ({"max_cpu_loras": 5}, (5, 5, 8)),
        ({"max_loras": 5}, (5, 7, 8)),
    ],
)
def test_size_lora_flags_fills_in_what_is_not_given(given: dict[str, int], expected: tuple[int, ...]) -> None:
    flags = size_lora_flags(LoraNeeds(adapters=5, rank=8), **{"max_loras": None, "max_cpu_loras": None,
                                                               "max_lora_rank": None, **given})  # fmt: skip
    assert (flags.max_loras, flags.max_cpu_loras, flags.max_lora_rank) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"max_loras": 4}, "--max-loras 4 is too small: pass --max-loras 5 or more"),
        ({"max_cpu_loras": 3}, "--max-cpu-loras 3 is too small: pass --max-cpu-loras 5 or more"),
        ({"max_lora_rank": 8}, "--max-lora-rank 8 is too small: pass --max-lora-rank 16 or more"),
        ({"max_lora_rank": 24}, "--max-lora-rank 24 is not a rank vLLM accepts: pass 32"),
        ({"max_loras": 6, "max_cpu_loras": 5}, "--max-cpu-loras 5 is below --max-loras 6"),
    ],
)
def test_size_lora_flags_refuses_too_small_flags_in_one_line(given: dict[str, int], message: str) -> None:
    with pytest.raises(LoraSlotError) as error:
        size_lora_flags(LoraNeeds(adapters=5, rank=16), **{"max_loras": None, "max_cpu_loras": None,
                                                            "max_lora_rank": None, **given})  # fmt: skip
    assert message in str(error.value)
    assert "5 adapters of LoRA rank up to 16 are served at start" in str(error.value)
    assert "\n" not in str(error.value)


def test_adapter_rank_rounds_up_to_a_rank_vllm_accepts(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, ["a", "b", "c"], seed=1)
    _set_rank(run_dir, "a", 4)
    _set_rank(run_dir, "b", 8, pattern={"q_proj": 12})
    folders = {name: run_dir / "experts" / name for name in ("a", "b", "c")}
    assert adapter_rank(folders["a"]) == 4
    assert adapter_rank(folders["b"]) == 12  # a per-module rank_pattern entry above r counts
    assert lora_needs({"a@1": folders["a"]}) == LoraNeeds(adapters=1, rank=8)
    assert lora_needs(folders) == LoraNeeds(adapters=3, rank=16)
    assert lora_needs({}) == LoraNeeds(adapters=0, rank=8)
    (folders["c"] / "adapter_config.json").unlink()
    with pytest.raises(LoraSlotError, match="cannot read the LoRA rank"):
        lora_needs(folders)


def test_served_at_start_counts_serving_versions_arms_and_the_guard(tmp_path: Path) -> None:
    from registry.service import Registry

    with Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store") as registry:
        assert served_at_start(registry, base_lora_guard=True) == {}  # no guard adapter without experts
        registry.register_run(make_run_dir(tmp_path, EXPERTS, seed=1))
        served = served_at_start(registry, base_lora_guard=True)
        assert sorted(served) == sorted([f"{name}@1" for name in EXPERTS] + [BASE_LORA_NAME])
        # 4 experts + base@0: the old fixed default --max-loras 4 was one short
        assert lora_needs(served) == LoraNeeds(adapters=5, rank=8)
        assert len(served_at_start(registry, base_lora_guard=False)) == 4

        registry.register_run(make_run_dir(tmp_path, ["math"], seed=2))
        registry.start_experiment("math", [(1, 0.5), (2, 0.5)])
        served = served_at_start(registry, base_lora_guard=True)
        assert {"math@1", "math@2"} <= set(served) and len(served) == 6


def test_growth_warning_names_each_flag() -> None:
    assert growth_warning([], LoraNeeds(3, 8)) is None
    line = growth_warning(
        [Shortfall("--max-loras", 5, 6), Shortfall("--max-lora-rank", 8, 16)], LoraNeeds(6, 16)
    )
    assert line is not None and "\n" not in line
    assert "--max-loras 5 < 6" in line and "--max-lora-rank 8 < 16" in line and "Restart `moea serve`" in line


def test_serve_refuses_too_small_flags_before_starting_vllm(tmp_path: Path) -> None:
    from registry.service import Registry

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with Registry(url, tmp_path / "store") as registry:
        run_dir = make_run_dir(tmp_path, EXPERTS, seed=1)
        _set_rank(run_dir, "dates", 16)
        registry.register_run(run_dir)
    env = {"MOEA_REGISTRY_URL": url, "MOEA_STORE_DIR": str(tmp_path / "store")}
    runner = CliRunner()
    # The registered base model does not exist: getting past the sizing would fail loudly, not start vLLM.
    for args, message in [
        (["--max-loras", "4"], "--max-loras 4 is too small: pass --max-loras 5 or more"),
        (["--max-lora-rank", "8"], "--max-lora-rank 8 is too small: pass --max-lora-rank 16 or more"),
    ]:
        result = runner.invoke(serve_command, ["--port", "0", *args], env=env)
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and message in errors[0], result.output


def test_gateway_warns_once_when_new_experts_outgrow_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    import httpx

    from registry.service import Registry
    from serving.engine import EnginePool
    from serving.gateway import Gateway
    from serving.settings import GatewayConfig
    from serving.vllm_process import EngineSettings

    async def refresh_twice(gateway: Gateway) -> list[str]:
        await gateway.refresh()
        await gateway.refresh()  # same registry state: the warning is not repeated
        return [r.getMessage() for r in caplog.records if "LoRA slots" in r.getMessage()]

    with Registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store") as registry:
        registry.register_run(make_run_dir(tmp_path, EXPERTS[:2], seed=1))
        # The engine `moea serve` would start for 2 experts + base@0 (never started here).
        settings = EngineSettings(model="/m", served_name="B", max_loras=3, max_cpu_loras=5, max_lora_rank=8)
        pool = EnginePool(httpx.AsyncClient(), settings=settings)
        gateway = Gateway(GatewayConfig(base_name="B"), registry, pool)
        try:
            assert asyncio.run(refresh_twice(gateway)) == []
            run_dir = make_run_dir(tmp_path, EXPERTS[2:], seed=2)
            _set_rank(run_dir, "dates", 16)
            registry.register_run(run_dir)
            warnings = asyncio.run(refresh_twice(gateway))
        finally:
            asyncio.run(gateway.close())
    assert len(warnings) == 1, warnings
    assert "--max-loras 3 < 5" in warnings[0] and "--max-lora-rank 8 < 16" in warnings[0]
    assert "--max-cpu-loras" not in warnings[0]  # 5 fit in host memory
