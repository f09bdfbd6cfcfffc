"""End-to-end training on the real embedded base model (a few steps each, CPU).

Covers: a 2-task run producing standard PEFT adapters that load and change the model's outputs,
exact resume after a SIGKILL, early stopping removing experts from sampling, and single-adapter mode.
"""

from __future__ import annotations

import json
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from sigkill import sigkill_when

from moe_adapters.config_load import load_mixture
from moe_adapters.train import apply_budget, single_adapter_max_steps, train_mixture
from moe_adapters.train_state import TrainError, warmup_cosine

FIXTURES = Path(__file__).parent / "fixtures"
MIXTURE = FIXTURES / "mixture.yaml"
# One thread makes runs bit-for-bit comparable (and fast on a shared 2-core machine).
BASE_OVERRIDES = {"train.num_threads": 1}


def run(out: Path, **overrides) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_mixture(MIXTURE, out, overrides={**BASE_OVERRIDES, **overrides}, progress=False)


BUDGET_CASES = [
    # (experts' max_steps, expert tasks, budget, single adapter's steps)
    (300, 5, "total", 300),  # equal total steps (and about equal tokens): today's behaviour
    (300, 5, "per-expert", 60),  # as many steps as one expert gets on average
    (200, 3, "per-expert", 67),  # rounded
    (2, 5, "per-expert", 1),  # never below one step
    (50, 1, "per-expert", 50),  # one expert: both budgets agree
]


@pytest.mark.parametrize(("max_steps", "n_experts", "budget", "expected"), BUDGET_CASES)
def test_single_adapter_budget_steps(max_steps: int, n_experts: int, budget: str, expected: int) -> None:
    assert single_adapter_max_steps(max_steps, n_experts, budget) == expected


def test_apply_budget_sets_steps_and_records_them() -> None:
    config = load_mixture(MIXTURE, {"train.max_steps": 40})
    n = len(config.expert_tasks)
    record = apply_budget(config, True, "per-expert")
    assert config.train.max_steps == round(40 / n)
    assert record == {
        "budget": "per-expert",
        "max_steps": round(40 / n),
        "experts_max_steps": 40,
        "n_experts": n,
    }
    config = load_mixture(MIXTURE, {"train.max_steps": 40})
    assert apply_budget(config, False, "total") is None and config.train.max_steps == 40
    with pytest.raises(TrainError, match="applies to --single-adapter runs only"):
        apply_budget(config, False, "per-expert")
    with pytest.raises(TrainError, match="unknown budget 'half'"):
        single_adapter_max_steps(40, 2, "half")


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup_steps=4, total_steps=14, floor=0.1)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)


@pytest.mark.slow
def test_two_task_run_produces_loadable_adapters(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run(tmp_path / "run", **{"train.max_steps": 8, "train.lr": 1e-3})
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["format_version"] == 1 and run_json["single_adapter"] is False
    assert set(run_json["tasks"]) == {"sentiment", "arithmetic"}  # replay task is no expert
    assert run_json["tasks"]["sentiment"]["kind"] == "classification"
    assert run_json["base_model_name"] == "SmolLM2-135M-Instruct" and len(run_json["base_model_sha256"]) == 64
    mixture = yaml.safe_load((out / "mixture.yaml").read_text())
    assert set(mixture["probabilities"]) == {"sentiment", "arithmetic"}
    assert sum(mixture["probabilities"].values()) == pytest.approx(1.0)
    metrics = json.loads((out / "metrics.json").read_text())
    experts = metrics["experts"]
    assert experts["sentiment"]["steps"] + experts["arithmetic"]["steps"] == 8
    for m in experts.values():
        assert m["best_val_loss"] > 0 and m["train_tokens"] > 0 and m["tokens_per_s"] > 0
    assert metrics["train"]["tokens_per_s"] > 0 and metrics["data"]["arithmetic"]["duplicates_dropped"] == 1
    assert (out / "train_curves.png").stat().st_size > 1000
    assert not (out / "checkpoint.pt").exists()

    base_path = run_json["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute 12 plus 30."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**prompt).logits
    for task in ("sentiment", "arithmetic"):
        folder = out / "experts" / task
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == base_path and config["r"] == 8
        keys = list(load_file(folder / "adapter_model.safetensors"))
        assert keys and all("expert_" not in k and ".lora_" in k for k in keys)  # PEFT's standard key names
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), folder
        )
        with torch.no_grad():
            logits = model(**prompt).logits
        assert (logits - base_logits).abs().max() > 1e-3, f"{task} adapter did not change the outputs"


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    overrides = {**BASE_OVERRIDES, "train.max_steps": 10, "train.checkpoint_every": 3, "train.eval_every": 2}
    reference = run(tmp_path / "reference", **overrides)

    killed = tmp_path / "killed"
    script = (
        "import json, sys; from pathlib import Path; from moe_adapters.train import train_mixture; "
        "train_mixture(Path(sys.argv[1]), Path(sys.argv[2]), overrides=json.loads(sys.argv[3]), progress=False)"
    )
    command = [sys.executable, "-c", script, str(MIXTURE), str(killed), json.dumps(overrides)]
    returncode = sigkill_when(command, (killed / "checkpoint.pt").exists, "the training process")
    assert returncode == -signal.SIGKILL
    assert not (killed / "run.json").exists()

    with pytest.raises(TrainError, match="already holds a run"):
        train_mixture(MIXTURE, killed, overrides=overrides, progress=False)
    with pytest.raises(TrainError, match="different mixture"):
        train_mixture(MIXTURE, killed, resume=True, overrides={**overrides, "train.lr": 1e-4}, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_mixture(MIXTURE, killed, resume=True, overrides=overrides, progress=False)

    ref_metrics = json.loads((reference / "metrics.json").read_text())["experts"]
    res_metrics = json.loads((killed / "metrics.json").read_text())["experts"]
    for task in ("sentiment", "arithmetic"):
        assert res_metrics[task]["steps"] == ref_metrics[task]["steps"]
        assert res_metrics[task]["best_val_loss"] == ref_metrics[task]["best_val_loss"]
        expected = load_file(reference / "experts" / task / "adapter_model.safetensors")
        resumed = load_file(killed / "experts" / task / "adapter_model.safetensors")
        assert expected.keys() == resumed.keys()
        for key, tensor in expected.items():
            assert torch.equal(tensor, resumed[key]), f"{task}/{key} differs after resume"


@pytest.mark.slow
def test_early_stopping_removes_expert_from_sampling(tmp_path):
    # lr so small that the val loss cannot improve by 1e-6: each expert stops at its 2nd evaluation.
    out = run(
        tmp_path / "run",
        **{
            "train.max_steps": 30,
            "train.lr": 1e-12,
            "train.eval_every": 1,
            "train.patience": 1,
            "train.warmup_steps": 0,
        },
    )
    experts = json.loads((out / "metrics.json").read_text())["experts"]
    for name in ("sentiment", "arithmetic"):
        assert experts[name]["stopped_early"] is True
        assert experts[name]["steps"] == 2, "a stopped expert must not be sampled again"
    curves_png = out / "train_curves.png"
    assert curves_png.exists()


@pytest.mark.slow
def test_single_adapter_mode(tmp_path):
    out = train_mixture(
        MIXTURE,
        tmp_path / "run",
        single_adapter=True,
        overrides={
            **BASE_OVERRIDES,
            "train.max_steps": 3,
            "train.eval_every": 0,
            "train.gradient_checkpointing": True,
        },
        progress=False,
    )
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["multitask"]
    assert json.loads((out / "run.json").read_text())["single_adapter"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["experts"]["multitask"]["steps"] == 3 and "router" not in metrics
    assert metrics["experts"]["multitask"]["tasks"] == ["sentiment", "arithmetic"]


@pytest.mark.slow
def test_router_trained_at_end_of_run(tmp_path):
    pytest.importorskip("moe_adapters.router")
    out = run(
        tmp_path / "run",
        **{
            "train.max_steps": 2,
            "train.eval_every": 0,
            "router.enabled": True,
            "router.encoder": "minilm",
            "router.heads": ["linear"],
            "router.epochs": 5,
        },
    )
    metrics = json.loads((out / "metrics.json").read_text())
    router_json = json.loads((out / "router" / "router.json").read_text())
    assert sorted(router_json["labels"]) == ["arithmetic", "sentiment"]
    assert 0.0 <= metrics["router"]["val_accuracy"] <= 1.0 and "threshold" in metrics["router"]
