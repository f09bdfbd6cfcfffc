"""The scaling benchmarks' parts that decide what they measure: the synthetic router tasks, the paired
gateway measurement, the curve tables in the README and what every results file records."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_adapter_curve  # noqa: E402
import bench_gateway  # noqa: E402
import bench_router_scale  # noqa: E402
import common  # noqa: E402
import report  # noqa: E402


def _words(prompt: str) -> set[str]:
    return set(re.findall(r"[a-z]+", prompt.lower()))


@pytest.mark.parametrize("count", [4, 16, 64])
def test_no_single_word_separates_a_synthetic_task(count: int) -> None:
    """A word in every prompt of one task and in no prompt of another would let a keyword route it."""
    splits = bench_router_scale.make_tasks(count, {"train": 40}, seed=3)
    tasks = splits["train"]
    assert len(tasks) == count and all(len(prompts) == 40 for prompts in tasks.values())
    for task, prompts in tasks.items():
        in_every = set.intersection(*(_words(p) for p in prompts))
        elsewhere = set().union(*(_words(p) for other, ps in tasks.items() if other != task for p in ps))
        assert in_every <= elsewhere, f"{task} is separable by {sorted(in_every - elsewhere)}"


def test_synthetic_splits_are_disjoint_and_seeded() -> None:
    sizes = {"train": 12, "val": 4, "test": 4}
    splits = bench_router_scale.make_tasks(16, sizes, seed=5)
    assert splits == bench_router_scale.make_tasks(16, sizes, seed=5)
    assert splits != bench_router_scale.make_tasks(16, sizes, seed=6)
    for task in splits["train"]:
        seen = [p for name in sizes for p in splits[name][task]]
        assert len(seen) == len(set(seen)) == 20
    with pytest.raises(ValueError, match="at most 64"):
        bench_router_scale.task_names(65)


def test_generated_ood_prompts_ask_for_no_task_operation() -> None:
    ood = bench_router_scale.ood_prompts(60, seed=1)
    assert len(ood) == 60 and len(set(ood)) > 30
    instructions = [w.lower() for ws in bench_router_scale.OPERATIONS.values() for w in ws]
    assert not [p for p in ood if any(i in p.lower() for i in instructions)]


def test_paired_measurements_alternate_which_side_runs_first() -> None:
    orders = [bench_gateway.pair_order(i) for i in range(4)]
    assert orders == [("direct", "gateway"), ("gateway", "direct")] * 2


def test_paired_median_is_not_the_difference_of_medians() -> None:
    # Load drifts up over the run; the gateway adds 1 ms to every pair.
    direct = [10.0, 20.0, 30.0, 40.0, 50.0]
    gateway = [11.0, 21.0, 31.0, 41.0, 51.0]
    paired = bench_gateway.paired_medians(direct, gateway)
    assert paired["difference"] == pytest.approx(1.0)
    assert paired["ratio"] == pytest.approx(30 / 31)
    # One slow outlier pair moves the median of differences much less than it moves a mean.
    assert bench_gateway.paired_medians([10.0, 10.0, 10.0], [11.0, 11.0, 90.0])["difference"] == 1.0
    with pytest.raises(ValueError, match="same non-zero number"):
        bench_gateway.paired_medians([1.0], [1.0, 2.0])


def test_write_result_records_command_load_and_git_state(tmp_path: Path) -> None:
    doc = json.loads(common.write_result("unit", {"mode": "smoke"}, results_dir=tmp_path).read_text())
    assert doc["command"].split()[0] == sys.executable
    assert len(doc["load_avg_before"]) == len(doc["load_avg_after"]) == 3
    machine = doc["machine"]
    assert machine["git_dirty"] == str(machine["git_commit"]).endswith("-dirty")


def test_curves_and_flags_render_into_the_report(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 cells"):
        common.curve("t", ["a", "b", "c"], [[1, 2]])
    row = common.summary("q", "p50", 2.0, 5.0, unit="ms", higher_is_better=False, target=1.0)
    table = common.curve("Thing vs size", ["size", "p50 ms"], [[10, 0.5], [10_000, 1.25]])
    payload = {"mode": "quick", "summary": row, "curve": table, "moea_flags": "--no-base-lora-guard"}
    common.write_result("scale", payload, results_dir=tmp_path)
    (tmp_path / "scale.png").write_bytes(b"png")
    assert "q; moea ran with `--no-base-lora-guard` [p50, ms]" in report.markdown(tmp_path)
    curves = report.curves_markdown(tmp_path, "results/")
    assert curves is not None
    assert "**Thing vs size** (quick)" in curves and "| 10,000 | 1.25 |" in curves
    assert "[scale.png](results/scale.png)" in curves
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.START}\n{report.END}\n{report.CURVES_START}\nold\n{report.CURVES_END}\n")
    report.write(report.markdown(tmp_path), readme, None, curves)
    assert report.marked_section(readme.read_text(), report.CURVES_START, report.CURVES_END) == curves


def test_readme_curves_are_the_ones_generated_from_the_results_files() -> None:
    readme = (BENCH.parent / "README.md").read_text()
    expected = report.curves_markdown(common.RESULTS_DIR)
    assert expected is not None, "no results file has a curve"
    fix = "run `python benchmarks/report.py --write README.md`"
    assert report.marked_section(readme, report.CURVES_START, report.CURVES_END) == expected, fix


def test_adapter_curve_row_pairs_the_rounds_and_counts_the_swaps() -> None:
    """The ratio is the median of per-round ratios (each round measured both arms), not a ratio of medians."""

    def run(tok: float, p50: float, loads: float | None = None) -> dict[str, float]:
        extra = {} if loads is None else {"loads": loads, "unloads": loads}
        return {
            "tokens_per_s": tok,
            "requests_per_s": 1.0,
            "failures": 0,
            "p50_ms": p50,
            "p95_ms": 2 * p50,
            **extra,
        }

    runs = {
        "moea": [run(50, 10, 4), run(90, 30, 8), run(40, 20, 6)],
        "vllm_base": [run(100, 5), run(100, 6), run(50, 7)],
    }
    row = bench_adapter_curve.row(16, runs)
    assert row["ratio_paired"] == 0.8  # per round 0.5, 0.9, 0.8; the ratio of medians would be 0.5
    assert (row["moea_tokens_per_s"], row["base_tokens_per_s"], row["moea_p50_ms"]) == (50, 100, 20)
    assert (row["loads_per_arm"], row["failures"], row["count"]) == (6, 0, 16)
