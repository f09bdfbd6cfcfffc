"""The example preference pairs (examples/preferences/): reproducible, valid for `moea train --dpo`, and the
held-back pairs never share a prompt with the training pairs or the sentiment training data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moe_adapters.preferences import read_preferences

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import make_preferences  # noqa: E402


def test_files_are_what_the_generator_writes() -> None:
    assert make_preferences.main(["--check"]) == 0


def test_pairs_are_valid_and_the_heldout_prompts_are_unseen() -> None:
    train = read_preferences(EXAMPLES / "preferences" / "sentiment_train.jsonl")
    heldout = read_preferences(EXAMPLES / "preferences" / "sentiment_heldout.jsonl")
    assert (len(train), len(heldout)) == (120, 40)
    # chosen = the house style of the label the SFT data gives that prompt, rejected = that plain label.
    assert all(
        p.rejected in ("positive", "negative") and p.chosen == make_preferences.house_style(p.rejected)
        for p in train + heldout
    )
    assert {p.chosen for p in heldout} == {"Positive.", "Negative."}
    sft_prompts = {json.loads(line)["prompt"] for line in (EXAMPLES / "data" / "sentiment.jsonl").open()}
    assert not {p.prompt for p in heldout} & (sft_prompts | {p.prompt for p in train})
