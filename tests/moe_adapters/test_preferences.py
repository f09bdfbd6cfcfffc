"""The preference-pair file format shared by ``moea feedback export`` and ``moea train --dpo``."""

import json

import pytest

from moe_adapters.preferences import (
    PreferenceFileError,
    PreferencePair,
    preference_file_sha256,
    read_preferences,
    write_preferences,
)


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_round_trip_keeps_messages_answers_and_metadata(tmp_path):
    pairs = [
        PreferencePair(
            (("user", "Classify: great"),), "positive", "Sounds positive!", {"expert": "sentiment"}
        ),
        PreferencePair((("system", "Be brief."), ("user", "2+2?")), "4", "The answer is four.", {}),
    ]
    digest = write_preferences(tmp_path / "p.jsonl", pairs)
    assert digest == preference_file_sha256(tmp_path / "p.jsonl")
    back = read_preferences(tmp_path / "p.jsonl")
    assert back == pairs
    assert back[0].meta == {"expert": "sentiment"}
    assert back[1].prompt == "2+2?"
    first = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert first == {
        "prompt": "Classify: great",
        "chosen": "positive",
        "rejected": "Sounds positive!",
        "expert": "sentiment",
    }


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "ok", "chosen": "a", "rejected": "b"},
            "{not json",
            "",
            {"prompt": "p", "messages": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "", "rejected": "b"},
            {"messages": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
            ["a list"],
        ],
    )
    with pytest.raises(PreferenceFileError) as err:
        read_preferences(path)
    problems = err.value.problems
    assert [p.split(": ", 1)[0].rsplit(":", 1)[1] for p in problems] == ["2", "4", "5", "6", "7", "8"]
    assert "not valid JSON" in problems[0]
    assert "exactly one of 'prompt'" in problems[1]
    assert "the same answer" in problems[2]
    assert "'chosen' must be non-empty" in problems[3]
    assert "last message must be a non-empty user message" in problems[4]
    assert "expected a JSON object" in problems[5]


def test_empty_and_missing_files_are_refused(tmp_path):
    with pytest.raises(PreferenceFileError, match="no preference pairs"):
        read_preferences(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(PreferenceFileError, match="no such file"):
        read_preferences(tmp_path / "absent.jsonl")
