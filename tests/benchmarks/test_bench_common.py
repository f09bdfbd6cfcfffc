"""benchmarks/common.py, report.py and the bench_training smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import report  # noqa: E402


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [1.0, 9.0, 2.0, 7.0, 4.0, 4.0, 8.0]])
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert common.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_and_median_of_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        common.percentile([], 50)
    with pytest.raises(ValueError, match="repeats"):
        common.median_of(lambda: None, 0)


def test_median_of_runs_warmup_plus_repeats() -> None:
    calls: list[int] = []
    seconds = common.median_of(lambda: calls.append(1), 5, warmup=2)
    assert len(calls) == 7 and seconds >= 0


@pytest.mark.parametrize(
    ("a", "b", "expected"), [(3.0, 2.0, 1.5), (1.0, 3.0, 0.333), (1.0, 0.0, None), (float("nan"), 1.0, None)]
)
def test_ratio(a: float, b: float, expected: float | None) -> None:
    assert common.ratio(a, b) == expected


def test_summary_orients_ratio_so_above_one_is_better() -> None:
    throughput = common.summary("q", "tok/s", 150.0, 100.0, unit="tok/s", higher_is_better=True, target=1.3)
    latency = common.summary("q", "p50", 2.0, 5.0, unit="ms", higher_is_better=False, target=1.0)
    assert (throughput["ratio"], throughput["met"]) == (1.5, True)
    assert (latency["ratio"], latency["met"]) == (2.5, True)
    assert common.summary("q", "m", None, 1.0, unit="u", higher_is_better=True, target=1.0)["met"] is None


def test_write_result_adds_machine_and_is_valid_json(tmp_path: Path) -> None:
    path = common.write_result("unit", {"value": np.float32(1.5), "where": tmp_path}, results_dir=tmp_path)
    doc = json.loads(path.read_text())
    assert path == tmp_path / "unit.json"
    assert doc["benchmark"] == "unit" and doc["value"] == 1.5 and doc["where"] == str(tmp_path)
    assert doc["machine"]["cpu_count"] >= 1 and "torch" in doc["machine"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="plain file stem"):
        common.write_result("../escape", {}, results_dir=tmp_path)


def test_the_results_a_run_writes_do_not_make_the_tree_dirty(tmp_path: Path, monkeypatch) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(common, "REPO_ROOT", tmp_path)
    clean = common._git_commit()
    assert clean is not None and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "x.json").write_text('{"new": 1}')  # what run_all writes
    assert common._git_commit() == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common._git_commit() == f"{clean}-dirty"


def test_report_renders_summaries_and_refreshes_a_marked_section(tmp_path: Path) -> None:
    row = common.summary("training", "tok/s", 170.0, 100.0, unit="tok/s", higher_is_better=True, target=1.3)
    common.write_result("training", {"mode": "quick", "summary": row}, results_dir=tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    table = report.markdown(tmp_path)
    assert "| training (quick) |" in table and "1.70×" in table and "✅" in table
    assert "unreadable" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    report.write(table, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text and "1.70×" in text


def test_readme_tables_are_the_ones_generated_from_the_results_files() -> None:
    """The README's benchmark and A/B simulation tables are written by report.py, never by hand."""
    readme = (BENCH.parent / "README.md").read_text()
    fix = "run `python benchmarks/report.py --write README.md`"
    assert report.marked_section(readme, report.START, report.END) == report.markdown(common.RESULTS_DIR), fix
    ab_table = report.ab_simulation_markdown(common.RESULTS_DIR)
    assert ab_table is not None
    assert report.marked_section(readme, report.AB_START, report.AB_END) == ab_table, fix


def test_run_all_rejects_unknown_arguments() -> None:
    result = subprocess.run([str(BENCH / "run_all"), "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument" in result.stderr


@pytest.mark.slow
def test_bench_training_smoke_writes_a_comparison(tmp_path: Path) -> None:
    """Both trainers really run on the example data and the JSON holds comparable numbers."""
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_training.py"),
            "--smoke",
            "--threads",
            "1",
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "training.json").read_text())
    (only,) = doc["results"]
    assert only["moea"]["steps"] == only["baseline"]["steps"]
    assert sum(only["moea"]["steps"].values()) == 2 * only["experts"]
    for side in ("moea", "baseline"):
        assert only[side]["train_tokens"] > 0 and only[side]["tokens_per_s"] > 0
    # Same rows and steps: token counts differ only by which rows were drawn.
    assert 0.5 < only["moea"]["train_tokens"] / only["baseline"]["train_tokens"] < 2
    assert doc["summary"]["ratio"] == pytest.approx(only["ratio_tokens_per_s"])
