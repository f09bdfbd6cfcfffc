"""Per-expert hyper-parameter sweep: the sweep file's checks, the search space, winners and the table (fast),
and one real sweep on the tiny test mixture whose run dir registers unchanged (slow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe_adapters.config import LoraSettings
from moe_adapters.sweep import SweepConfig, SweepError, Trial, load_sweep, sweep_markdown, winners
from moe_adapters.sweep_run import trial_overrides

FIXTURES = Path(__file__).parent / "fixtures"
MIXTURE = FIXTURES / "mixture.yaml"
DEFAULTS = {"lr": 2e-4, "r": 8, "steps": 12}


def _sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


INVALID_SWEEPS = [
    # (sweep.yaml text, part of the one-line error)
    ("method: grid\n", "params: required"),
    ("method: grid\nparams: {lr: [1e-4]}\ntrials: 3\n", "grid tries every combination"),
    ("method: random\nparams: {lr: [1e-4]}\n", "method random needs trials >= 1"),
    ("method: grid\nparams: {lr: {min: 1e-4, max: 1e-3}}\n", "needs method: random"),
    ("method: random\ntrials: 2\nparams: {lr: {min: 1e-3, max: 1e-4}}\n", "min <= max"),
    ("method: random\ntrials: 2\nparams: {lr: {low: 1e-3}}\n", "a range is {min: X, max: Y}"),
    ("method: grid\nparams: {r: [4, 0]}\n", "params.r: 0 is not a positive int"),
    ("method: grid\nparams: {r: [4.5]}\n", "params.r: 4.5 is not a positive int"),
    ("method: grid\nparams: {steps: []}\n", "params.steps: the list is empty"),
    ("method: grid\nparams: {dropout: [0.1]}\n", "unknown parameter(s) ['dropout']"),
    ("method: grid\nparams: {}\n", "give at least one of"),
    ("method: bayes\nparams: {lr: [1e-4]}\n", "method: 'bayes' is not one of ['grid', 'random']"),
    ("method: grid\nparams: {lr: [1e-4]}\npatience: 0\n", "patience: must be >= 1"),
    ("method: grid\nparams: {lr: [1e-4]}\nwarmup: 3\n", "unknown key(s) ['warmup']"),
    ("method: random\ntrials: 65\nparams: {lr: [1e-4]}\n", "65 trials per expert; at most 64"),
    ("- lr\n", "top level must be a mapping"),
    ("method: [grid\n", "invalid YAML"),
]


@pytest.mark.parametrize(("text", "message"), INVALID_SWEEPS)
def test_invalid_sweep_files_give_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = _sweep(tmp_path, text)
    with pytest.raises(SweepError) as error:
        load_sweep(path, DEFAULTS)
    assert message in str(error.value) and str(error.value).startswith(f"sweep file {path}: ")
    assert "\n" not in str(error.value)


def test_grid_is_every_combination_in_order_with_defaults(tmp_path: Path) -> None:
    _, trials = load_sweep(
        _sweep(tmp_path, "method: grid\nparams: {lr: [1e-4, 1e-3], steps: [5, 9]}\n"), DEFAULTS
    )
    assert [(t.index, t.lr, t.r, t.steps) for t in trials] == [
        (0, 1e-4, 8, 5),
        (1, 1e-4, 8, 9),
        (2, 1e-3, 8, 5),
        (3, 1e-3, 8, 9),
    ]  # YAML 1.1 reads 1e-4 as a string: the sweep reads it as a number
    assert trials[3].name == "trial-03" and trials[3].values == {"lr": 1e-3, "steps": 9}


def test_random_draws_are_seeded_and_inside_the_ranges(tmp_path: Path) -> None:
    text = "method: random\ntrials: 20\nseed: 3\nparams:\n  lr: {min: 1e-4, max: 1e-2, log: true}\n  r: {min: 2, max: 16}\n"
    _, first = load_sweep(_sweep(tmp_path, text), DEFAULTS)
    _, again = load_sweep(_sweep(tmp_path, text), DEFAULTS)
    assert first == again and len(first) == 20
    assert all(1e-4 <= t.lr <= 1e-2 and 2 <= t.r <= 16 and t.steps == 12 for t in first)
    assert len({t.lr for t in first}) > 10  # drawn, not a constant
    assert sum(t.lr < 1e-3 for t in first) >= 5  # log-uniform: about half below the geometric middle
    _, other = load_sweep(_sweep(tmp_path, text.replace("seed: 3", "seed: 4")), DEFAULTS)
    assert [t.lr for t in other] != [t.lr for t in first]


def test_trial_overrides_keep_the_alpha_over_r_ratio() -> None:
    sweep = SweepConfig(params={"r": [4]}, patience=2, eval_every=5)
    overrides = trial_overrides(Trial(0, 1e-3, 4, 30), sweep, LoraSettings(r=8, alpha=16))
    assert overrides == {
        "train.lr": 1e-3,
        "lora.r": 4,
        "lora.alpha": 8,
        "train.max_steps": 30,
        "train.patience": 2,
        "train.eval_every": 5,
    }
    assert "train.eval_every" not in trial_overrides(
        Trial(0, 1e-3, 4, 30), SweepConfig(params={}), LoraSettings()
    )


ROWS = [
    {"task": "a", "trial": 0, "lr": 1e-4, "r": 8, "steps": 5, "steps_taken": 5, "stopped_early": False, "best_val_loss": 2.0},
    {"task": "a", "trial": 1, "lr": 1e-3, "r": 8, "steps": 5, "steps_taken": 3, "stopped_early": True, "best_val_loss": 1.5},
    {"task": "a", "trial": 2, "lr": 1e-2, "r": 8, "steps": 5, "steps_taken": 5, "stopped_early": False, "best_val_loss": 1.5},
    {"task": "b", "trial": 0, "lr": 1e-4, "r": 8, "steps": 5, "steps_taken": 5, "stopped_early": False, "best_val_loss": None},
    {"task": "b", "trial": 1, "lr": 1e-3, "r": 8, "steps": 5, "steps_taken": 5, "stopped_early": False, "best_val_loss": 0.7},
]  # fmt: skip


def test_winner_is_lowest_val_loss_earlier_trial_on_ties_never_without_loss() -> None:
    assert winners(ROWS) == {"a": 1, "b": 1}
    assert winners([ROWS[3]]) == {}


def test_markdown_table_marks_each_winner() -> None:
    table = sweep_markdown(ROWS, {"a": 1, "b": 1})
    lines = [line for line in table.splitlines() if line.startswith("| a") or line.startswith("| b")]
    assert len(lines) == 5
    assert lines[1] == "| a | 1 | 0.001 | 8 | 5 | 3 | yes | 1.5000 | **yes** |"
    assert lines[2].endswith("| 1.5000 |  |") and lines[3].split("|")[8].strip() == "n/a"
    assert "lowest best_val_loss" in table


@pytest.mark.slow
def test_sweep_run_dir_holds_winners_and_registers(tmp_path: Path, registry_url: str) -> None:
    from safetensors.torch import load_file

    from serving.cli_root import moea

    sweep = _sweep(
        tmp_path,
        "method: grid\nparams:\n  lr: [1.0e-5, 2.0e-3]\n  steps: [4]\npatience: 1\neval_every: 2\n",
    )
    out = tmp_path / "run"
    start = time.perf_counter()
    result = CliRunner().invoke(
        moea,
        ["train", str(MIXTURE), "--sweep", str(sweep), "--out", str(out), "--set", "train.num_threads=1"],
    )
    wall_s = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    print(f"sweep: 2 experts x 2 trials x 4 steps: {wall_s:.1f} s wall")
    print((out / "sweep.md").read_text())

    summary = json.loads((out / "sweep.json").read_text())
    assert summary["metric"] == "best_val_loss" and len(summary["trials"]) == 4
    for task in ("sentiment", "arithmetic"):
        rows = [r for r in summary["trials"] if r["task"] == task]
        best = min(rows, key=lambda r: r["best_val_loss"])
        assert summary["winners"][task]["trial"] == best["trial"]
        winner_dir = out / "sweep" / task / f"trial-{best['trial']:02d}" / "experts" / task
        saved = load_file(out / "experts" / task / "adapter_model.safetensors")
        expected = load_file(winner_dir / "adapter_model.safetensors")
        assert saved.keys() == expected.keys() and all((saved[k] == expected[k]).all() for k in saved)
    assert (out / "sweep.png").stat().st_size > 1000 and "**yes**" in (out / "sweep.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["experts"]["sentiment"]["sweep_trial"] == summary["winners"]["sentiment"]["trial"]

    again = CliRunner().invoke(moea, ["train", str(MIXTURE), "--sweep", str(sweep), "--out", str(out)])
    assert again.exit_code != 0 and "already holds a finished run" in str(again.exception)

    store = tmp_path / "store"
    registered = CliRunner().invoke(
        moea, ["register", str(out), "--registry-url", registry_url, "--store-dir", str(store)]
    )
    assert registered.exit_code == 0, registered.output
    assert "sentiment" in registered.output and "arithmetic" in registered.output


def test_sweep_refuses_single_adapter_and_resume(tmp_path: Path) -> None:
    from serving.cli_root import moea

    sweep = _sweep(tmp_path, "method: grid\nparams: {lr: [1.0e-4]}\n")
    for flag in ("--single-adapter", "--resume"):
        result = CliRunner().invoke(
            moea, ["train", str(MIXTURE), "--sweep", str(sweep), "--out", str(tmp_path / "run"), flag]
        )
        assert result.exit_code == 2 and "--sweep trains experts and continues by itself" in result.output
    assert not (tmp_path / "run").exists()
