"""Paired differences vs the multi-task LoRA: the point estimate is the reported score difference, and the
bootstrap interval behaves as an interval (degenerate where the rows leave no doubt, seeded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_adapters.eval_paired import headline, paired_differences, row_stats
from moe_adapters.eval_plan import plan_requests
from moe_adapters.eval_report import render_markdown
from moe_adapters.eval_scoring import score_report
from moe_adapters.eval_types import EvalCase, EvalSettings
from moe_adapters.metrics import score_task

TESTS = {"test_list": ["assert add(2, 3) == 5"], "test_setup_code": ""}
# (kind, predictions, references, extras): every headline metric, with rows that score between 0 and 1
HEADLINE_CASES = [
    ("classification", ["positive", "Negative.", "maybe"], ["positive", "negative", "positive"], None),
    ("math", ["so 12", "The answer is 7", "3.5"], ["12", "8", "3.50"], None),
    ("extraction", ['{"a": 1}', '{"a": 2}', "no"], ['{"a": 1}', '{"a": 1}', '{"b": 0}'], None),
    ("generation", ["the cat sat", "a dog ran far", ""], ["the cat sat down", "the dog ran", "hello"], None),
    (
        "qa",
        ["Denver", "in 1990", "blue"],
        ["Denver Broncos", "1990", "red"],
        [{"references": ["Denver Broncos", "Broncos"]}, {}, {}],
    ),
    (
        "ner",
        ["person: Ann\nlocation: Paris", "", "person: Bob\nperson: Eve"],
        ["person: Ann\nlocation: Rome", "", "person: Bob"],
        None,
    ),
    (
        "code",
        ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"],
        ["def add(a, b):\n    return a + b"] * 2,
        [TESTS, TESTS],
    ),
    ("code", ["def add(a, b): return a + b", "x"], ["def add(a, b): return a + b"] * 2, None),  # no tests
]


@pytest.mark.parametrize(("kind", "predictions", "references", "extras"), HEADLINE_CASES)
def test_summed_row_stats_give_the_reported_headline(kind, predictions, references, extras) -> None:
    expected = score_task(kind, predictions, references, None, extras)["score"]
    stats = row_stats(kind, predictions, references, None, extras)
    assert len(stats) == len(predictions)
    assert float(headline(kind, stats.sum(0))) == pytest.approx(expected)


def _mean_rows(values: list[float]) -> np.ndarray:
    return np.array([[v, 1.0] for v in values])


def test_paired_interval_is_degenerate_without_doubt_and_seeded() -> None:
    same = _mean_rows([1, 0, 1, 0, 1])
    better = _mean_rows([1] * 5)
    worse = _mean_rows([0] * 5)
    out = paired_differences({"a": ("math", same, same), "b": ("math", better, worse)})
    assert out["tasks"]["a"] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 5}
    assert out["tasks"]["b"] == {"diff": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 5}
    assert out["mean"] == {"diff": 0.5, "ci_low": 0.5, "ci_high": 0.5}
    noisy_a = _mean_rows([1, 0, 1, 1, 0, 1, 0, 1, 1, 0] * 4)
    noisy_b = _mean_rows([0, 1, 1, 0, 0, 1, 1, 0, 1, 0] * 4)
    first = paired_differences({"t": ("classification", noisy_a, noisy_b)})
    assert first == paired_differences({"t": ("classification", noisy_a, noisy_b)})  # seeded
    entry = first["tasks"]["t"]
    assert entry["diff"] == pytest.approx(0.1)
    assert entry["ci_low"] < 0 < entry["ci_high"]  # 0.6 vs 0.5 on 40 rows is no evidence
    assert entry["ci_low"] <= entry["diff"] <= entry["ci_high"]
    ner = np.array([[1, 0, 1], [0, 1, 0], [2, 0, 0]], float)  # micro F1 from summed counts
    assert paired_differences({"n": ("ner", ner, ner)})["tasks"]["n"]["diff"] == 0.0
    with pytest.raises(ValueError, match="task t: 3 rows for one system but 2"):
        paired_differences({"t": ("math", _mean_rows([1, 0, 1]), _mean_rows([1, 0]))})
    assert paired_differences({}) == {"tasks": {}, "mean": None}


def test_eval_report_compares_every_system_with_the_multitask_lora() -> None:
    cases = [EvalCase("math", "math", f"{i}+{i}?", [], str(2 * i), False) for i in range(6)]
    cases.append(EvalCase("general", "generation", "hi", [], "hello", True))
    routes = ["math"] * 6 + [None]
    plan = plan_requests(
        cases, routes, {"math": Path("m")}, Path("mt"), EvalSettings(systems=("base", "moe", "multitask"))
    )
    answers = {"math": [0, 2, 4, 6, 0, 0], "multitask": [0, 2, 0, 0, 0, 0], None: [1] * 6}
    texts = []
    for adapter, case in plan.requests:
        key = "multitask" if adapter is not None and adapter != "math" else adapter
        texts.append(str(answers[key][case]) if case < 6 else "hello")
    report = score_report(cases, routes, plan, texts, ["math"])
    paired = report["paired"]
    assert paired["reference"] == "multitask" and set(paired["systems"]) == {"base", "moe"}
    moe = paired["systems"]["moe"]["tasks"]["math"]
    scores = {s: m["score"] for s, m in report["tasks"]["math"]["systems"].items()}
    assert moe["diff"] == pytest.approx(scores["moe"] - scores["multitask"]) == pytest.approx(2 / 6)
    assert 0 <= moe["ci_low"] <= moe["diff"] <= moe["ci_high"]  # moe is never worse on a row here
    markdown = render_markdown(report)
    assert "## Paired differences vs multitask (95% bootstrap interval over test rows)" in markdown
    assert "| moe | +0.333 [" in markdown
    no_reference = plan_requests(
        cases, routes, {"math": Path("m")}, None, EvalSettings(systems=("base", "moe"))
    )
    report = score_report(cases, routes, no_reference, ["0"] * len(no_reference.requests), ["math"])
    assert report["paired"] is None and "Paired differences" not in render_markdown(report)
