"""`moea train --dpo` without training: the dpo: settings, pair tokenization, preference accuracy, and the
command's refusals (each a clear error with nothing written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moe_adapters.base_model import resolve_base_model
from moe_adapters.config import ConfigError, DpoSettings
from moe_adapters.config_load import load_mixture
from moe_adapters.dpo_data import tokenize_pairs
from moe_adapters.dpo_eval import PairScores, greedy_win_rate, heldout_line, preference_accuracy
from moe_adapters.greedy import answer_text
from moe_adapters.preferences import PreferenceFileError, read_preferences
from moe_adapters.prompting import PromptSpec

REPO = Path(__file__).resolve().parents[2]
MIXTURE = REPO / "examples" / "mixture.yaml"
PREFS = REPO / "examples" / "preferences" / "sentiment_train.jsonl"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(None))


def test_dpo_defaults_and_overrides() -> None:
    assert load_mixture(MIXTURE).dpo == DpoSettings(
        beta=0.1, lr=5e-5, max_steps=50, batch_size=4, max_length=256, sft_weight=0.0
    )
    assert load_mixture(MIXTURE, {"dpo.beta": 0.3, "dpo.lr": "1e-4"}).dpo.lr == 1e-4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dpo.beta": 0}, "dpo.beta: must be > 0, got 0"),
        ({"dpo.lr": -1e-5}, "dpo.lr: must be > 0"),
        ({"dpo.max_steps": 0}, "dpo.max_steps: must be >= 1, got 0"),
        ({"dpo.batch_size": 0}, "dpo.batch_size: must be >= 1"),
        ({"dpo.sft_weight": -1}, "dpo.sft_weight: must be >= 0 (0 = plain DPO), got -1"),
        ({"dpo.max_length": "long"}, "dpo.max_length: expected an integer, got 'long'"),
        ({"dpo.gamma": 1}, "dpo: unknown key(s) ['gamma']"),
    ],
)
def test_bad_dpo_settings_are_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_mixture(MIXTURE, overrides)
    assert message in str(caught.value)


def test_pairs_tokenize_like_sft_and_long_pairs_are_line_numbered(tokenizer: Any, tmp_path: Path) -> None:
    spec = PromptSpec("Answer with one word: positive or negative.")
    pairs = read_preferences(PREFS)[:3]
    tokens = tokenize_pairs(pairs, tokenizer, spec, 256)
    eos = tokenizer.eos_token_id
    for pair, token in zip(pairs, tokens, strict=True):
        assert token.chosen_ids == [*tokenizer(pair.chosen, add_special_tokens=False)["input_ids"], eos]
        assert token.rejected_ids[-1] == eos and token.prompt_ids[-1] != eos
        assert "one word" in tokenizer.decode(token.prompt_ids)  # the version's system prompt is applied
    long = tmp_path / "long.jsonl"
    long.write_text(
        PREFS.read_text().splitlines()[0]
        + "\n"
        + json.dumps({"prompt": "x " * 400, "chosen": "a", "rejected": "b"})
        + "\n"
    )
    with pytest.raises(PreferenceFileError, match=r"long\.jsonl:2: \d+ tokens .* > dpo\.max_length=256"):
        tokenize_pairs(read_preferences(long), tokenizer, spec, 256)


def test_preference_accuracy_readings() -> None:
    # pair 0: prefers chosen; pair 1: prefers rejected in sum but not per token (4 vs 1 tokens).
    scores = PairScores(
        chosen=[-1.0, -4.0], rejected=[-3.0, -2.0], chosen_tokens=[2, 4], rejected_tokens=[2, 1]
    )
    reference = PairScores(
        chosen=[-2.0, -4.0], rejected=[-2.0, -1.0], chosen_tokens=[2, 4], rejected_tokens=[2, 1]
    )
    report = preference_accuracy(scores, reference, beta=0.5)
    assert (report["accuracy"], report["accuracy_per_token"], report["mean_logp_gap"]) == (0.5, 1.0, 0.0)
    # margins vs the reference: pair 0: 2 - 0 = 2 > 0; pair 1: -2 - (-3) = 1 > 0.
    assert (report["reward_accuracy"], report["mean_reward_margin"]) == (1.0, 0.5 * 1.5)
    assert (report["mean_chosen_logp"], report["mean_rejected_logp"]) == (-2.5, -2.5)
    assert "reward_accuracy" not in preference_accuracy(scores)
    assert (
        preference_accuracy(reference, reference)["reward_accuracy"] == 0.0
    )  # the start scores 0 by definition


def test_greedy_win_rate_compares_decoded_answers_keeping_case_and_punctuation(tokenizer: Any) -> None:
    pairs = tokenize_pairs(read_preferences(PREFS)[:4], tokenizer, PromptSpec("Answer with one word."), 256)
    chosen = [answer_text(tokenizer, p.chosen_ids) for p in pairs]
    assert chosen[0] in ("Positive.", "Negative.")  # decoded without the EOS
    rejected = answer_text(tokenizer, pairs[1].rejected_ids)
    # pair 0 answered as chosen, pair 1 as rejected (surrounding whitespace ignored); pair 2 in another
    # case, pair 3 without the period: neither (the style is what the pairs are about).
    answers = [chosen[0], f" {rejected}\n", chosen[2].upper(), chosen[3].rstrip(".")]
    report = greedy_win_rate(tokenizer, pairs, answers)
    assert (report["greedy_chosen"], report["greedy_rejected"]) == (0.25, 0.25)
    assert report["greedy_top_answers"][0][1] == 1
    before = {"pairs": 4, "accuracy": 0.0, "greedy_chosen": 0.0, "greedy_rejected": 1.0}
    line = heldout_line(before, {**report, "pairs": 4, "accuracy": 1.0})
    assert "accuracy 0.00 → 1.00" in line and "chosen 0.00 → 0.25" in line


def _train(*args: str) -> Any:
    from serving.cli_root import moea

    return CliRunner().invoke(moea, ["train", str(MIXTURE), *args], catch_exceptions=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dpo", str(PREFS)], "--dpo needs --from NAME@ALIAS"),
        (["--from", "sentiment@prod"], "--from and --dpo-heldout need --dpo"),
        (
            ["--dpo", str(PREFS), "--from", "sentiment@prod", "--single-adapter"],
            "drop --single-adapter and --sweep",
        ),
    ],
)
def test_option_misuse_is_a_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    result = _train("--out", str(tmp_path / "run"), *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "run").exists()


def test_bad_preference_file_lists_every_bad_line_and_writes_nothing(
    isolated_home: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "prefs.jsonl"
    good = PREFS.read_text().splitlines()[0]
    bad.write_text(
        f'{good}\n{{"prompt": "x", "chosen": "a"\n\n{{"prompt": "x", "chosen": "a", "rejected": "a"}}\n'
    )
    result = _train("--out", str(tmp_path / "run"), "--dpo", str(bad), "--from", "sentiment@prod")
    assert result.exit_code == 1 and result.output.startswith("Error: 2 problem(s) in the preference file")
    assert f"{bad}:2: not valid JSON" in result.output
    assert f"{bad}:4: 'chosen' and 'rejected' are the same answer" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("ref", ["sentiment@prod", "sentiment@3", "Bad Name!"])
def test_unknown_or_malformed_ref_is_one_line_and_writes_nothing(
    isolated_home: Path, tmp_path: Path, ref: str
) -> None:
    result = _train("--out", str(tmp_path / "run"), "--dpo", str(PREFS), "--from", ref)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_bad_dpo_setting_stops_the_command_before_anything_is_written(
    isolated_home: Path, tmp_path: Path
) -> None:
    result = _train(
        "--out", str(tmp_path / "run"), "--dpo", str(PREFS), "--from", "sentiment@prod", "--set", "dpo.beta=0"
    )
    assert result.exit_code == 1 and "dpo.beta: must be > 0" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("preset", [None, "DEBUG"])
def test_importing_trl_leaves_the_vllm_log_level_as_it_was(preset: str | None) -> None:
    """trl sets VLLM_LOGGING_LEVEL=ERROR on import; engines started later by the same process inherited it
    and lost their INFO log (the CPU LoRA kernel's 'installed' line among them). Fresh interpreter: trl is
    imported once per process."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    if preset is not None:
        env["VLLM_LOGGING_LEVEL"] = preset
    code = (
        "import os; from moe_adapters.dpo import _import_trl; _import_trl(); import trl; "
        "print(repr(os.environ.get('VLLM_LOGGING_LEVEL')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == repr(preset)
