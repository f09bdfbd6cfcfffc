"""The eval gate on promotion (moe_adapters/eval_gate.py) with a real SQLite registry and store.

Golden-set scores come through the `scorer` seam from :class:`FakeScorer` (a fake: fixed scores per
version and made-up answers, no model), so these tests check the gate's own logic: caching per
(version, golden hash), refusal, --force, the margin, and the fallback to recorded eval scores. The slow
test in tests/e2e/test_eval_gate.py runs the real scorer (vLLM) on trained runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from moe_adapters.eval_gate import GateRefused, GateScore, decide, evaluate_gate, gated_promote
from registry.service import Registry

GOLDEN = [{"prompt": f"{i}+{i}?", "response": str(2 * i)} for i in range(5)]


def make_run(root: Path, seed: int, score: float | None = None, metric: str = "accuracy") -> Path:
    """A format-1 run dir with one tiny adapter `math` (and an eval.json with its score when given)."""
    run = root / f"run-{seed}"
    folder = run / "experts" / "math"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"lora_A": np.full((2, 2), seed, dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    tasks = {"math": {"kind": "math", "system_prompt": "Solve it."}}
    (run / "run.json").write_text(json.dumps({"format_version": 1, "base_model": "base", "tasks": tasks}))
    if score is not None:
        oracle = {"metric": metric, "score": score}
        (run / "eval.json").write_text(
            json.dumps({"tasks": {"math": {"n": 20, "systems": {"oracle": oracle}}}})
        )
    return run


class FakeScorer:
    """A fake scorer (no model): version ref → fixed score; answers ``<ref>:<row>``; records its calls."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.calls: list[list[str]] = []

    def __call__(self, views: list[Any], rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        self.calls.append([v.ref for v in views])
        return {
            v.ref: {"metric": "final_number_accuracy", "score": self.scores[v.ref], "n": len(rows),
                    "answers": [f"{v.ref}:{i}" for i in range(len(rows))]}
            for v in views
        }  # fmt: skip


@pytest.fixture
def registry(registry_url: str, tmp_path: Path) -> Any:
    reg = Registry(registry_url, tmp_path / "store")
    reg.register_run(make_run(tmp_path, 1))  # math@1 takes prod
    reg.register_run(make_run(tmp_path, 2))
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(json.dumps(r) + "\n" for r in GOLDEN))
    reg.attach_golden("math", golden)
    yield reg
    reg.close()


def test_scores_are_computed_once_per_version_and_golden_set(registry: Registry) -> None:
    scorer = FakeScorer({"math@1": 0.80, "math@2": 0.79})
    view, decision = gated_promote(registry, "math@2", scorer=scorer)
    assert (
        view.ref == "math@2" and decision.passed and scorer.calls == [["math@2", "math@1"]]
    )  # one generation
    assert "eval gate passed on golden set v1" in registry.history("math")[-1].reason
    assert "delta -0.0100, margin 0.02" in registry.history("math")[-1].reason
    # Re-promoting (here back and forth) generates nothing: both scores are cached in the registry.
    registry.promote("math@1")
    _, again = gated_promote(registry, "math@2", scorer=scorer)
    assert len(scorer.calls) == 1 and again.candidate.cached and again.holder.cached  # type: ignore[union-attr]
    # The first rows' answers are recorded for the gateway's load check.
    probes = registry.golden_probes("math", 2).probes  # type: ignore[union-attr]
    assert [p["answer"] for p in probes] == ["math@2:0", "math@2:1", "math@2:2"]
    assert probes[0]["messages"] == [{"role": "user", "content": "0+0?"}] and probes[0]["max_tokens"] == 96
    # A new golden set version is a new cache key: scored again.
    golden = Path(registry.store.root).parent / "golden2.jsonl"
    golden.write_text(json.dumps(GOLDEN[0]) + "\n")
    registry.attach_golden("math", golden)
    registry.promote("math@1")
    gated_promote(registry, "math@2", scorer=scorer)
    assert len(scorer.calls) == 2


def test_a_worse_version_is_refused_unless_forced(registry: Registry) -> None:
    scorer = FakeScorer({"math@1": 0.80, "math@2": 0.70})
    with pytest.raises(
        GateRefused, match=r"eval gate failed .* math@2 final_number_accuracy=0.7000 vs math@1 0.8000"
    ):
        gated_promote(registry, "math@2", scorer=scorer)
    assert registry.resolve("math").ref == "math@1" and len(registry.history("math")) == 1  # nothing moved
    assert gated_promote(registry, "math@2", margin=0.15, scorer=scorer)[1].passed  # a wider margin passes
    registry.rollback("math")
    view, decision = gated_promote(registry, "math@2", force=True, reason="hotfix", scorer=scorer)
    assert view.ref == "math@2" and not decision.passed
    assert registry.history("math")[-1].reason.startswith(
        "hotfix; forced past the eval gate: eval gate failed"
    )
    assert len(scorer.calls) == 1  # cached across all three


def test_margin_is_absolute_on_the_headline_metric() -> None:
    def score(ref: str, value: float, metric: str = "accuracy") -> GateScore:
        return GateScore(ref, metric, value, 10)

    assert decide(score("x@2", 0.78), score("x@1", 0.80), 0.02, "s").passed  # exactly at the margin
    assert not decide(score("x@2", 0.7799), score("x@1", 0.80), 0.02, "s").passed
    assert decide(score("x@2", 0.5), score("x@1", 0.5), 0.0, "s").passed
    differ = decide(score("x@2", 0.1, "rougeL"), score("x@1", 0.9), 0.02, "s")
    assert differ.passed and differ.note.startswith("not gated: metrics differ")
    assert decide(None, score("x@1", 0.9), 0.02, "s").note.startswith(
        "not gated: the candidate has no eval score"
    )
    with pytest.raises(ValueError, match="margin"):
        evaluate_gate(None, "x@2", margin=-1)


def test_without_a_holder_the_promote_is_not_gated(registry_url: str, tmp_path: Path) -> None:
    with Registry(registry_url, tmp_path / "store") as reg:
        reg.register_run(make_run(tmp_path, 1))
        reg.remove_alias("math", "prod")
        scorer = FakeScorer({"math@1": 0.5})
        view, decision = gated_promote(reg, "math@1", alias="canary", scorer=scorer)
        assert decision.passed and decision.note.startswith("not gated: no version holds canary")
        assert reg.resolve("math@canary").ref == "math@1" and scorer.calls == []  # golden set: none attached


def _moea(*args: str) -> Any:
    from serving.cli_root import moea

    return CliRunner().invoke(moea, list(args), catch_exceptions=False)


def test_cli_falls_back_to_recorded_eval_scores_without_a_golden_set(
    isolated_home: Path, tmp_path: Path
) -> None:
    for seed, score in ((1, 0.9), (2, 0.5)):
        assert _moea("register", str(make_run(tmp_path, seed, score))).exit_code == 0
    refused = _moea("registry", "promote", "math@2")
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert refused.output.startswith("Error: eval gate failed on recorded eval scores (test split")
    assert "math@2 accuracy=0.5000 vs math@1 0.9000" in refused.output and "--force" in refused.output
    forced = _moea("registry", "promote", "math@2", "--force", "--reason", "known regression")
    assert forced.exit_code == 0 and "math@prod → math@2" in forced.output
    history = _moea("registry", "history", "math").output
    assert "forced past the eval gate" in history
    # The library call and `python -m registry.cli` stay ungated.
    from registry.cli import main

    plain = CliRunner().invoke(main, ["registry", "promote", "math@1"], catch_exceptions=False)
    assert plain.exit_code == 0 and plain.output.strip() == "math@prod → math@1"


def test_cli_without_any_eval_promotes_and_says_it_was_not_gated(isolated_home: Path, tmp_path: Path) -> None:
    for seed in (1, 2):
        _moea("register", str(make_run(tmp_path, seed)))
    done = _moea("registry", "promote", "math@2")
    assert done.exit_code == 0 and "not gated: the candidate has no eval score" in done.output


def _real_adapter(base: str, out: Path, seed: int) -> None:
    """A real PEFT LoRA (r=8, q/v) with random non-zero weights: vLLM loads it, answers differ from base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")  # fmt: skip
    get_peft_model(model, config).save_pretrained(out)


@pytest.mark.slow
def test_real_gated_promote_generates_once_with_vllm_and_caches(isolated_home: Path, tmp_path: Path) -> None:
    """`moea registry promote` end to end: the real scorer (vLLM's offline engine, moea eval's metrics) on
    two real adapter versions; the re-promote afterwards reads the cache and generates nothing."""
    from moe_adapters.base_model import DEFAULT_BASE_NAME, resolve_base_model

    base = resolve_base_model(None)
    for seed in (1, 2):
        run = tmp_path / f"real-{seed}"
        _real_adapter(base, run / "experts" / "math", seed)
        tasks = {"math": {"kind": "math", "system_prompt": "Answer with the number only."}}
        run_json = {
            "format_version": 1,
            "base_model": base,
            "base_model_name": DEFAULT_BASE_NAME,
            "tasks": tasks,
        }
        (run / "run.json").write_text(json.dumps(run_json))
        assert _moea("register", str(run)).exit_code == 0
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(json.dumps(r) + "\n" for r in GOLDEN[1:5]))
    assert _moea("registry", "attach-eval", "math", str(golden)).exit_code == 0

    first = _moea("registry", "promote", "math@2", "--margin", "1", "--max-new-tokens", "16")
    assert first.exit_code == 0, first.output
    assert "eval gate passed on golden set v1" in first.output and "math@prod → math@2" in first.output
    with Registry() as reg:
        scores = {s.version: s for s in reg.eval_scores("math")}
        assert sorted(scores) == [1, 2] and all(
            s.metric == "final_number_accuracy" and s.n == 4 for s in scores.values()
        )
        assert [len(s.probes) for s in scores.values()] == [3, 3]
        assert all(isinstance(p["answer"], str) for s in scores.values() for p in s.probes)
        assert (
            scores[1].probes[0]["answer"] != scores[2].probes[0]["answer"]
            or scores[1].probes != scores[2].probes
        )
        reg.rollback("math")

        def no_generation(*_: Any) -> Any:  # a fake scorer that fails the test: the cache must answer
            raise AssertionError("the re-promote generated again")

        margin = 0.0
        expect_pass = scores[2].score >= scores[1].score - margin
        if expect_pass:
            _, decision = gated_promote(reg, "math@2", margin=margin, scorer=no_generation)
            assert decision.passed and decision.candidate.cached  # type: ignore[union-attr]
        else:
            with pytest.raises(GateRefused):
                gated_promote(reg, "math@2", margin=margin, scorer=no_generation)
    shown = _moea("registry", "show", "math").output
    assert "@1 final_number_accuracy=" in shown and "@2 final_number_accuracy=" in shown
