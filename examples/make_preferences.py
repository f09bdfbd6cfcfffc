"""Write the example preference pairs for the sentiment expert (deterministic, stdlib only).

The preference is a house style the SFT data never taught: the label as a capitalised sentence,
``Positive.`` / ``Negative.``, over the expert's own plain lowercase label (``positive``), which is what
``data/sentiment.jsonl`` trains it to say. Both answers name the same label (the pairs are about form,
not correctness, and ``moea eval``'s classification metric scores both as correct); the SFT expert
prefers the rejected one, so DPO has something to move. Why a team would want it: the answer is shown
verbatim to people (a support dashboard, a reply draft), where a bare lowercase word reads as a glitch.
Writes, relative to this folder:

- ``preferences/sentiment_train.jsonl``: 120 pairs on prompts of ``data/sentiment.jsonl``;
- ``preferences/sentiment_heldout.jsonl``: 40 pairs on ``data/unseen/sentiment.jsonl``, prompts worded
  with instructions no training row uses; never trained on (``moea train --dpo-heldout``).

Same seed → byte-identical files::

    python examples/make_preferences.py            # writes both files with seed 13
    python examples/make_preferences.py --check    # fail if the files on disk differ
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_SEED = 13
TRAIN_PAIRS = 120


def house_style(label: str) -> str:
    """The preferred form of a label: capitalised, ending with a period (``positive`` → ``Positive.``)."""
    return f"{label.capitalize()}."


def _pairs(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    # chosen = the house style, rejected = the SFT data's own answer (the lowercase label) for that prompt.
    return [
        {"prompt": row["prompt"], "chosen": house_style(row["response"]), "rejected": row["response"]}
        for row in rows
    ]


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_files(seed: int = DEFAULT_SEED, examples: Path = EXAMPLES_DIR) -> dict[str, str]:
    """Relative path → file text of both preference files."""
    rng = random.Random(seed)
    train_rows = _read(examples / "data" / "sentiment.jsonl")
    rng.shuffle(train_rows)
    heldout_rows = _read(examples / "data" / "unseen" / "sentiment.jsonl")
    files = {
        "preferences/sentiment_train.jsonl": _pairs(train_rows[:TRAIN_PAIRS]),
        "preferences/sentiment_heldout.jsonl": _pairs(heldout_rows),
    }
    return {
        rel: "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
        for rel, pairs in files.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="RNG seed (default %(default)s).")
    parser.add_argument("--check", action="store_true", help="Do not write; exit 1 if files on disk differ.")
    args = parser.parse_args(argv)
    files = build_files(args.seed)
    stale = [
        rel
        for rel, text in files.items()
        if not (EXAMPLES_DIR / rel).is_file() or (EXAMPLES_DIR / rel).read_text(encoding="utf-8") != text
    ]
    if args.check:
        if stale:
            print(
                f"out of date: {', '.join(stale)}; run `python examples/make_preferences.py`", file=sys.stderr
            )
            return 1
        return 0
    for rel, text in files.items():
        (EXAMPLES_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
        (EXAMPLES_DIR / rel).write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
