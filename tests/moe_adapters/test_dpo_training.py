"""DPO on the examples, for real (slow): a briefly trained sentiment expert is registered, tuned with
`train_dpo` on the project's preference pairs (house style `Positive.` over the plain `positive` the SFT
data taught), and on the held-back pairs both its preference accuracy and its greedy answers move from
the rejected to the chosen form; the run registers as the next version with its lineage."""

from __future__ import annotations

import json
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from sigkill import sigkill_when

from moe_adapters.dpo import train_dpo
from moe_adapters.preferences import preference_file_sha256
from moe_adapters.train import train_mixture
from registry.service import Registry

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PREFS = EXAMPLES / "preferences" / "sentiment_train.jsonl"
HELDOUT = EXAMPLES / "preferences" / "sentiment_heldout.jsonl"
SYSTEM_PROMPT = "Answer with one word: positive or negative."  # as in examples/mixture.yaml
DPO_STEPS = 20
DPO_BATCH = 4
DPO_LR = 5e-4  # 10x the default: the test has few steps to move a style the SFT data never taught
# Measured at 16 steps: plain DPO moved accuracy 0 -> 0.95 but greedy answers drifted to neither form
# ("negative.", "Unfavourable."): greedy = chosen 0 -> 0.2; sft_weight 1: 0 -> 0.475. The SFT term on the
# chosen answers keeps the answers on the house style (20 steps, sft_weight 2: 0 -> 0.7).
SFT_WEIGHT = 2.0


def sentiment_mixture(tmp_path: Path) -> Path:
    """The examples' sentiment task alone, trained only briefly (so DPO has something left to move)."""
    mixture = {
        "base_model": "default",
        "splits": {"train": 0.8, "val": 0.1, "test": 0.1, "seed": 13},
        "train": {
            "max_steps": 10,
            "batch_size": 8,
            "lr": 1e-3,
            "warmup_steps": 2,
            "eval_every": 0,
            "checkpoint_every": 0,
            "max_length": 128,
            "num_threads": 1,
            "seed": 13,
        },
        "router": {"enabled": False},
        "dpo": {
            "max_steps": DPO_STEPS,
            "batch_size": DPO_BATCH,
            "lr": DPO_LR,
            "sft_weight": SFT_WEIGHT,
            "max_length": 128,
        },
        "tasks": [
            {
                "name": "sentiment",
                "files": [str(EXAMPLES / "data" / "sentiment.jsonl")],
                "kind": "classification",
                "system_prompt": SYSTEM_PROMPT,
            }
        ],
    }
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(mixture))
    return path


def registered_sft(tmp_path: Path) -> tuple[Path, Path, str, Path]:
    """(mixture, SFT run dir, registry URL, store) with the briefly trained expert registered as sentiment@1."""
    mixture = sentiment_mixture(tmp_path)
    registry_url, store = f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sft = train_mixture(mixture, tmp_path / "sft", progress=False)
    with Registry(registry_url, store) as registry:
        assert registry.register_run(sft).experts[0].ref == "sentiment@1"
    return mixture, sft, registry_url, store


def test_dpo_moves_the_expert_towards_the_chosen_answers(tmp_path: Path) -> None:
    mixture, _, registry_url, store = registered_sft(tmp_path)

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train_dpo(
            mixture,
            tmp_path / "dpo",
            PREFS,
            "sentiment@prod",
            heldout_path=HELDOUT,
            registry_url=registry_url,
            store_dir=store,
            progress=False,
        )
    wall_s = time.perf_counter() - start
    metrics = json.loads((run / "metrics.json").read_text())
    before, after = metrics["dpo"]["heldout"]["before"], metrics["dpo"]["heldout"]["after"]
    print(f"\nDPO {DPO_STEPS} steps x {DPO_BATCH} pairs, lr {DPO_LR}, 1 thread, {wall_s:.0f}s: held-back")
    print(f"  before: {json.dumps(before)}\n  after:  {json.dumps(after)}")

    assert metrics["train"]["steps"] == DPO_STEPS and metrics["train"]["torch_threads"] == 1
    # The SFT expert prefers, and says, its own plain label; after DPO it prefers and says the house style,
    # on prompts it never trained on.
    assert before["accuracy"] <= 0.2 and after["accuracy"] >= 0.8
    assert before["greedy_chosen"] <= 0.1 and before["greedy_rejected"] >= 0.5
    assert after["greedy_chosen"] >= 0.6 and after["greedy_rejected"] <= 0.1  # measured 0.7, 0.0
    assert after["reward_accuracy"] >= 0.9 and after["mean_reward_margin"] > 0

    with Registry(registry_url, store) as registry:
        view = registry.register_run(run).experts[0]
        assert (view.ref, view.parent_version, view.aliases) == ("sentiment@2", 1, [])
        assert view.config["lineage"]["preferences_sha256"] == preference_file_sha256(PREFS)
        assert view.config["task"]["system_prompt"] == SYSTEM_PROMPT  # same prompt as the parent
        assert registry.resolve("sentiment@prod").version == 1  # registering moves no traffic


def test_dpo_on_a_4bit_base_writes_an_ordinary_adapter(tmp_path: Path) -> None:
    """train.quantize=4bit reaches DPO (it used to be ignored): the base is loaded in 4-bit (bitsandbytes'
    CPU backend here), the adapter trains, and what is written is an ordinary LoRA of the same shape as its
    parent's (in bf16: TRL's QLoRA practice), which registers as the next version."""
    import torch
    from safetensors.torch import load_file

    mixture, sft, registry_url, store = registered_sft(tmp_path)
    overrides = {"train.quantize": "4bit", "dpo.max_steps": 2, "dpo.batch_size": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train_dpo(
            mixture, tmp_path / "dpo", PREFS, "sentiment@1", registry_url=registry_url, store_dir=store,
            overrides=overrides, progress=False,
        )  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["dpo"]["quantize"], metrics["train"]["steps"]) == ("4bit", 2)
    assert "quantize: 4bit" in (run / "mixture.yaml").read_text()

    parent = load_file(sft / "experts" / "sentiment" / "adapter_model.safetensors")
    child = load_file(run / "experts" / "sentiment" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in child.items()} == {k: v.shape for k, v in parent.items()}
    # TRL's DPOTrainer casts a quantized model's LoRA weights to bf16 (QLoRA paper, section 3); SFT keeps fp32.
    assert {v.dtype for v in child.values()} == {torch.bfloat16}
    assert any(not child[k].equal(parent[k].to(torch.bfloat16)) for k in parent)  # DPO moved the adapter
    with Registry(registry_url, store) as registry:
        assert registry.register_run(run).experts[0].ref == "sentiment@2"


def test_dpo_resumes_after_sigkill_to_the_uninterrupted_adapter(tmp_path: Path) -> None:
    """A DPO run killed (SIGKILL, a real crash) after its first checkpoint continues with --resume and ends
    with exactly the adapter of an uninterrupted run; it is never restarted by accident, nor resumed with
    other preference data or after --from moved to another version."""
    import torch
    from safetensors.torch import load_file

    from moe_adapters.dpo_resume import DPO_CHECKPOINTS, DPO_IDENTITY, latest_checkpoint
    from moe_adapters.train_state import TrainError

    mixture, sft, registry_url, store = registered_sft(tmp_path)
    overrides = {"dpo.max_steps": 8, "dpo.batch_size": 2, "train.checkpoint_every": 3}
    common = {"registry_url": registry_url, "store_dir": store, "overrides": overrides, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = train_dpo(mixture, tmp_path / "reference", PREFS, "sentiment@prod", **common)
    assert not (reference / DPO_CHECKPOINTS).exists() and not (reference / DPO_IDENTITY).exists()

    killed = tmp_path / "killed"
    script = (
        "import json, sys; from pathlib import Path; from moe_adapters.dpo import train_dpo; "
        "a = json.loads(sys.argv[1]); "
        "train_dpo(Path(a['mixture']), Path(a['out']), Path(a['prefs']), 'sentiment@prod', "
        "registry_url=a['url'], store_dir=Path(a['store']), overrides=a['overrides'], progress=False)"
    )
    args = {"mixture": str(mixture), "out": str(killed), "prefs": str(PREFS), "url": registry_url,
            "store": str(store), "overrides": overrides}  # fmt: skip
    command = [sys.executable, "-c", script, json.dumps(args)]
    returncode = sigkill_when(command, lambda: latest_checkpoint(killed) is not None, "the DPO process")
    assert returncode == -signal.SIGKILL and not (killed / "run.json").exists()
    stopped_at = latest_checkpoint(killed)
    assert stopped_at is not None and stopped_at.name in ("checkpoint-3", "checkpoint-6")

    with pytest.raises(TrainError, match="stopped at dpo_checkpoints/checkpoint-"):
        train_dpo(mixture, killed, PREFS, "sentiment@prod", **common)
    with pytest.raises(TrainError, match="preferences_sha256"):
        train_dpo(mixture, killed, HELDOUT, "sentiment@prod", resume=True, **common)
    with Registry(registry_url, store) as registry:  # prod moves to a new version: the run started from @1
        registry.register_run(sft)
        registry.promote("sentiment@2", "prod")
    with pytest.raises(TrainError, match="from_version 'sentiment@1' -> 'sentiment@2'"):
        train_dpo(mixture, killed, PREFS, "sentiment@prod", resume=True, **common)
    assert latest_checkpoint(killed) == stopped_at  # refusals changed nothing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_dpo(mixture, killed, PREFS, "sentiment@1", resume=True, **common)
    assert json.loads((killed / "metrics.json").read_text())["train"]["steps"] == 8
    assert not (killed / DPO_CHECKPOINTS).exists() and not (killed / DPO_IDENTITY).exists()
    expected = load_file(reference / "experts" / "sentiment" / "adapter_model.safetensors")
    resumed = load_file(killed / "experts" / "sentiment" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, resumed[key]), f"{key} differs after resume"
    with pytest.raises(TrainError, match="already holds a finished run"):
        train_dpo(mixture, killed, PREFS, "sentiment@1", resume=True, **common)
