"""Router: threshold rule, abstain behaviour (OOD → base), in-distribution routing, save/load."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moe_adapters.config import RouterSettings
from moe_adapters.ood_prompts import OOD_PROMPTS
from moe_adapters.router import Router, benchmark_router, choose_threshold, decide
from moe_adapters.router_encoder import RouterError
from moe_adapters.router_training import train_router

try:  # works whether or not tests/moe_adapters is a package (pytest's default prepend import mode)
    from .router_data import HELDOUT_OOD, task_prompts
except ImportError:
    from router_data import HELDOUT_OOD, task_prompts  # type: ignore[no-redef]

# ------------------------------------------------------------------------------------ pure functions

THRESHOLD_CASES = [
    # (confidences, correct, target, floor, expected)
    ([0.9, 0.8, 0.7], [True, True, True], 0.01, 0.0, 0.0),  # nothing to reject → floor
    ([0.9, 0.8, 0.7], [True, True, True], 0.01, 0.5, 0.5),
    ([0.9, 0.8, 0.7], [True, True, False], 0.01, 0.0, math.nextafter(0.7, 1)),  # reject the wrong one
    ([0.9, 0.8, 0.7], [False, True, True], 0.01, 0.0, math.nextafter(0.9, 1)),  # top is wrong → all
    ([0.9, 0.8, 0.7, 0.6], [True, True, False, True], 0.5, 0.0, 0.0),  # 1/4 ≤ 50 %: accept all
    ([0.9, 0.8, 0.8, 0.7], [True, True, False, True], 0.01, 0.0, math.nextafter(0.8, 1)),  # ties together
]


@pytest.mark.parametrize(("confidence", "correct", "target", "floor", "expected"), THRESHOLD_CASES)
def test_choose_threshold(confidence, correct, target, floor, expected) -> None:
    assert choose_threshold(confidence, correct, target, floor) == pytest.approx(expected, abs=0)


def test_threshold_keeps_error_at_or_below_target_on_random_scores() -> None:
    generator = torch.Generator().manual_seed(0)
    confidence = torch.rand(500, generator=generator).tolist()
    # Correctness more likely at high confidence, as with a real classifier.
    correct = [c > 0.3 * float(torch.rand(1, generator=generator)) + 0.2 for c in confidence]
    threshold = choose_threshold(confidence, correct, 0.05)
    accepted = [ok for c, ok in zip(confidence, correct, strict=True) if c >= threshold]
    assert accepted and accepted.count(False) <= 0.05 * len(accepted)
    lower = max(c for c in confidence if c < threshold)  # one step lower breaks the target
    accepted_lower = [ok for c, ok in zip(confidence, correct, strict=True) if c >= lower]
    assert accepted_lower.count(False) > 0.05 * len(accepted_lower)


def test_decide_abstains_below_threshold_and_when_out_of_scope_wins() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.45, 0.1, 0.45], [0.3, 0.2, 0.5], [0.55, 0.4, 0.05]])
    index, confidence = decide(probs, threshold=0.5, n_labels=2)
    assert index.tolist() == [0, -1, -1, 0]
    assert confidence.tolist() == pytest.approx([0.7, 0.45, 0.3, 0.55])
    index, _ = decide(probs, threshold=0.0, n_labels=2)
    # Out-of-scope wins row 3 whatever the threshold; a tie with it (row 2) abstains too.
    assert index.tolist() == [0, -1, -1, 0]


def test_product_ood_prompts_do_not_overlap_the_heldout_test_set() -> None:
    assert not set(OOD_PROMPTS) & set(HELDOUT_OOD)
    assert len(set(OOD_PROMPTS)) == len(OOD_PROMPTS) >= 100


# ------------------------------------------------------------------------------ trained (MiniLM)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("router")
    metrics = train_router(
        task_prompts(120, seed=0), task_prompts(30, seed=1), out, RouterSettings(encoder="minilm")
    )
    return out, metrics


@pytest.fixture(scope="module")
def router(trained: tuple[Path, dict]) -> Router:
    return Router.load(trained[0], device="cpu")


def test_router_json_follows_the_contract(trained: tuple[Path, dict]) -> None:
    out, metrics = trained
    meta = json.loads((out / "router.json").read_text())
    assert meta["format_version"] == 1
    assert meta["kind"] in {"linear-head", "mlp-head"}
    assert meta["encoder_kind"] == "minilm"
    assert meta["labels"] == sorted(task_prompts(1, 0))
    assert 0.5 <= meta["threshold"] <= 1.0
    assert meta["metrics"]["val_accuracy"] == metrics["val_accuracy"] >= 0.95
    assert (out / "head.safetensors").is_file()


def test_metrics_report_every_candidate_and_baseline(trained: tuple[Path, dict]) -> None:
    _, metrics = trained
    heads = {c["head"] for c in metrics["candidates"]}
    assert heads == {"linear", "mlp", "centroid"}
    assert 0.0 <= metrics["baselines"]["tfidf_logreg"]["val_accuracy"] <= 1.0
    assert "nearest_centroid[minilm]" in metrics["baselines"]
    assert metrics["accepted_error"] <= metrics["target_error"]
    assert set(metrics["latency_ms"]) == {"1", "32"}


def test_in_distribution_prompts_go_to_their_expert(router: Router) -> None:
    test = task_prompts(25, seed=7)  # unseen fillers/phrasings
    total = correct = wrong = 0
    for label, prompts in test.items():
        for decision in router.route(prompts):
            total += 1
            correct += decision.label == label
            wrong += decision.label not in (label, None)
    assert correct >= 0.95 * total
    assert wrong <= 0.02 * total


def test_heldout_out_of_scope_prompts_mostly_end_at_the_base(router: Router) -> None:
    decisions = router.route(HELDOUT_OOD)
    abstained = [d for d in decisions if d.label is None]
    assert len(abstained) >= 0.8 * len(HELDOUT_OOD), [
        (p, d.label) for p, d in zip(HELDOUT_OOD, decisions, strict=True) if d.label
    ]


def test_decisions_are_consistent_with_threshold_and_probabilities(router: Router) -> None:
    prompts = [*task_prompts(3, seed=9)["math"], *HELDOUT_OOD[:3]]
    for decision in router.route(prompts):
        assert set(decision.probabilities) == set(router.labels)
        assert decision.confidence == pytest.approx(max(decision.probabilities.values()))
        if decision.label is not None:
            assert decision.confidence >= router.threshold
            assert decision.probabilities[decision.label] == pytest.approx(decision.confidence)


def test_batched_routing_matches_one_by_one(router: Router) -> None:
    prompts = [*task_prompts(4, seed=11)["extract"], *task_prompts(4, seed=11)["sentiment"], HELDOUT_OOD[0]]
    batched = router.route(prompts)
    single = [router.route([p])[0] for p in prompts]
    for a, b in zip(batched, single, strict=True):
        assert a.label == b.label
        assert a.confidence == pytest.approx(b.confidence, abs=1e-4)
    assert router.route([]) == []


def test_routing_from_many_threads_is_safe(router: Router) -> None:
    """A threaded server calls route() concurrently; the shared tokenizer must not fail."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [*task_prompts(3, seed=12)["math"], *HELDOUT_OOD[:3]]
    expected = [d.label for d in router.route(prompts)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: [d.label for d in router.route(prompts)], range(8)))
    assert all(labels == expected for labels in results)


def test_save_load_round_trip_is_exact(router: Router, tmp_path: Path) -> None:
    router.save(tmp_path / "copy")
    again = Router.load(tmp_path / "copy", device="cpu")
    prompts = [*task_prompts(2, seed=3)["translate_fr"], HELDOUT_OOD[5]]
    assert again.labels == router.labels and again.threshold == router.threshold
    assert torch.equal(again.task_probabilities(prompts), router.task_probabilities(prompts))


def test_benchmark_reports_p50_per_batch_size(router: Router) -> None:
    result = benchmark_router(router, batch_sizes=(1, 4), repeats=3)
    assert set(result) == {"1", "4"} and all(v["p50"] > 0 for v in result.values())


def test_loading_and_routing_leave_process_wide_torch_settings_alone(tmp_path: Path) -> None:
    """Threads and inductor freezing are the caller's choice (serving sets them), never the library's."""
    import torch._inductor.config as inductor_config

    from moe_adapters.router_encoder import RouterHead, SentenceEncoder

    encoder = SentenceEncoder("minilm", device="cpu", max_length=16)
    Router(encoder, RouterHead(encoder.dim, 3), ["a", "b"], 0.5, none_class=True).save(tmp_path)
    threads, freezing = torch.get_num_threads(), inductor_config.freezing
    loaded = Router.load(tmp_path, device="cpu")
    assert len(loaded.route(["hello there", "what is 2 + 2?"])) == 2
    assert (torch.get_num_threads(), inductor_config.freezing) == (threads, freezing)


def test_load_missing_folder_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(RouterError, match="router.json not found"):
        Router.load(tmp_path)


def test_train_rejects_tasks_without_prompts(tmp_path: Path) -> None:
    with pytest.raises(RouterError, match="no training prompts"):
        train_router({"a": ["x"], "b": ["  "]}, {}, tmp_path, RouterSettings(encoder="minilm"))


def test_foreign_settings_objects_are_accepted(tmp_path: Path) -> None:
    """The training config's own RouterSettings (a subset of fields, other defaults) works unchanged."""

    @dataclass
    class ConfigRouterSettings:
        encoder: str = "minilm"
        epochs: int = 5
        lr: float = 1e-2
        batch_size: int = 64
        max_length: int = 64
        target_error: float = 0.05
        seed: int = 0

    data = task_prompts(30, seed=4)
    metrics = train_router(data, {}, tmp_path, ConfigRouterSettings())  # val carved from train
    meta = json.loads((tmp_path / "router.json").read_text())
    assert meta["max_length"] == 64 and metrics["target_error"] == 0.05
    assert all(n > 0 for n in metrics["n_val"].values())


# --------------------------------------------------------------------------- base-model encoder


@pytest.mark.slow
def test_base_mean_pool_encoder_trains_and_round_trips(tmp_path: Path) -> None:
    settings = RouterSettings(encoder="base-mean-pool", heads=("linear",), epochs=15)
    metrics = train_router(task_prompts(24, seed=0), task_prompts(8, seed=1), tmp_path, settings)
    assert metrics["encoder_kind"] == "base-mean-pool" and metrics["val_accuracy"] >= 0.9
    router = Router.load(tmp_path, device="cpu")
    decisions = router.route(task_prompts(5, seed=5)["math"])
    assert sum(d.label == "math" for d in decisions) >= 4


def test_compiled_cpu_router_decides_like_the_plain_one(trained: tuple[Path, dict]) -> None:
    """`moea serve` compiles the CPU router (bf16 where native, torch.compile, freezing): same decisions."""
    import torch._inductor.config as inductor_config

    plain, compiled = Router.load(trained[0], device="cpu"), Router.load(trained[0], device="cpu")
    freezing = inductor_config.freezing
    assert compiled.compile_for_cpu() > 0
    assert inductor_config.freezing == freezing, "freezing is an option of the router's compile only"
    assert compiled.encoder.model is not plain.encoder.model and hasattr(
        compiled.encoder.model, "_orig_mod"
    ), "compile fell back to the plain encoder (see the warning in the log)"
    prompts = [p for ps in task_prompts(10, seed=11).values() for p in ps] + [
        "hello there",
        "Wie spät ist es?",
    ]
    want = plain.task_probabilities(prompts)
    got = torch.cat(
        [compiled.task_probabilities([p]) for p in prompts[:6]] + [compiled.task_probabilities(prompts[6:])]
    )
    torch.testing.assert_close(got, want, atol=0.02, rtol=0.0)
    assert [d.label for d in compiled.route(prompts)] == [d.label for d in plain.route(prompts)]
