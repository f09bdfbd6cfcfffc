"""`moea feedback export`: preference pairs from rated, logged answers in a real SQLite registry (rows written
with the registry calls the gateway's request-log writer makes), read back with read_preferences."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from moe_adapters.feedback_export import (
    CAPPED,
    DROP_REASONS,
    DUPLICATE,
    EMPTY_ANSWER,
    NO_CONTENT,
    NO_PAIR,
    NOT_CHAT,
    NOT_COMPARABLE,
    SAME_ANSWER,
    TIE,
    export_preferences,
)
from moe_adapters.preferences import read_preferences
from registry.errors import NotFoundError, ValidationError
from registry.service import Registry
from registry.views import OutcomeRecord, RequestRecord
from serving.cli_root import moea
from tests.registry.helpers import make_run_dir

_ids = itertools.count()


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def served(
    registry: Registry,
    version: int,
    messages: Any,
    answer: str | None,
    *,
    thumbs: bool | None = None,
    reward: float | None = None,
    experiment_id: int | None = None,
    content: bool = True,
    status: int = 200,
    shadow: bool = False,
    expert: str = "summarize",
) -> str:
    """Log one answered request of `expert@version` (content only when `content`) and rate it."""
    request_id = f"chatcmpl-{next(_ids)}"
    record = RequestRecord(
        request_id, datetime.now(UTC), expert, version, experiment_id, "u1", False, 12.0, 5, 7, status,
        shadow=shadow, messages=messages if content else None, answer=answer if content else None,
    )  # fmt: skip
    registry.log_requests([record])
    if thumbs is not None or reward is not None:
        outcome = OutcomeRecord(
            request_id, datetime.now(UTC), reward=reward, thumbs=thumbs, outcome_id=request_id
        )
        assert registry.record_outcomes([outcome]) == []
    return request_id


@pytest.fixture
def registry(registry_url: str, tmp_path: Path) -> Registry:
    reg = Registry(registry_url, tmp_path / "store")
    for seed in (1, 2):
        reg.register_run(make_run_dir(tmp_path / f"run{seed}", seed=seed, router=False))
    yield reg
    reg.close()


def test_thumbs_up_is_chosen_over_thumbs_down_and_the_file_reads_back(
    registry: Registry, tmp_path: Path
) -> None:
    down = served(
        registry, 1, ask("Summarize: rain all day."), "Well, it seems it rained a lot!", thumbs=False
    )
    up = served(registry, 2, ask("Summarize: rain all day."), "Rainy day.", thumbs=True)
    history = [{"role": "system", "content": "Be brief."}, *ask("Summarize: sun.")]
    served(registry, 1, history, "Sunny.", thumbs=True)
    served(registry, 1, history, "It was sunny outside, I think.", thumbs=False)

    report = export_preferences(registry, "summarize", tmp_path / "prefs.jsonl")
    assert (len(report.pairs), report.rated, report.used, sum(report.dropped.values())) == (2, 4, 4, 0)
    pairs = read_preferences(tmp_path / "prefs.jsonl")
    assert pairs == report.pairs  # the DPO step reads exactly what was exported
    first, second = pairs
    assert (first.prompt, first.chosen, first.rejected) == (
        "Summarize: rain all day.",
        "Rainy day.",
        "Well, it seems it rained a lot!",
    )
    assert first.meta == {
        "expert": "summarize", "versions": [2, 1], "request_ids": [up, down], "experiment_id": None,
        "preferred_by": "thumbs",
    }  # fmt: skip
    assert second.client_messages() == history and second.chosen == "Sunny."  # the two samples of one version


@pytest.mark.parametrize(
    ("rewards", "min_gap", "pairs", "gap"),
    [
        ((0.9, 0.6), 0.5, 0, None),  # gap 0.3 below the default min-gap: a tie
        ((0.9, 0.6), 0.2, 1, 0.3),
        ((0.2, 0.9), 0.5, 1, 0.7),  # the later answer wins
        ((0.5, 0.5), 0.0, 0, None),  # equal rewards are a tie even with min-gap 0
    ],
)
def test_reward_pairs_need_a_gap_of_at_least_min_gap(
    registry: Registry,
    tmp_path: Path,
    rewards: tuple[float, float],
    min_gap: float,
    pairs: int,
    gap: float | None,
) -> None:
    for version, (reward, text) in enumerate(
        zip(rewards, ("First answer.", "Second answer."), strict=True), 1
    ):
        served(registry, version, ask("Summarize: x"), text, reward=reward)
    report = export_preferences(registry, "summarize", tmp_path / "prefs.jsonl", min_gap=min_gap)
    assert len(report.pairs) == pairs
    if pairs:
        best = "First answer." if rewards[0] > rewards[1] else "Second answer."
        assert report.pairs[0].chosen == best
        assert report.pairs[0].meta["reward_gap"] == pytest.approx(gap)
        assert report.pairs[0].meta["preferred_by"] == "reward"
    else:
        assert report.dropped == Counter({TIE: 2}) and report.path is None
        assert not (tmp_path / "prefs.jsonl").exists()  # no pair: nothing written


def test_every_rated_answer_is_in_a_pair_or_counted_under_one_reason(
    registry: Registry, tmp_path: Path
) -> None:
    served(registry, 1, ask("q1"), "Short.", thumbs=True, content=False)  # served without --log-content
    served(registry, 1, "Once upon a time", " there was a cat.", thumbs=True)  # a /v1/completions prompt
    served(registry, 1, ask("q2"), "   ", thumbs=True)  # empty answer
    served(registry, 1, ask("q3"), "Alone.", thumbs=False)  # nobody else answered q3
    served(registry, 1, ask("q4"), "Same.", thumbs=True)
    served(registry, 2, ask("q4"), "Same.", thumbs=False)  # different ratings, same text: nothing to prefer
    served(registry, 1, ask("q5"), "Good.", thumbs=True)
    served(registry, 2, ask("q5"), "Also good.", thumbs=True)  # two ups: a tie
    served(registry, 1, ask("q6"), "Rated by thumbs.", thumbs=True)
    served(registry, 2, ask("q6"), "Rated by reward.", reward=3.0)  # not comparable
    served(registry, 1, ask("q7"), "Best.", thumbs=True)
    served(registry, 2, ask("q7"), "Worst.", thumbs=False)
    served(registry, 2, ask("q7"), "Worst.", thumbs=False)  # the same pair again: a duplicate
    served(registry, 1, ask("q7"), "Unrated.")  # no rating: not a rated answer at all
    served(registry, 1, ask("q7"), "Failed.", thumbs=False, status=500)  # errors are not answers
    served(registry, 2, ask("q7"), "Shadow.", thumbs=False, shadow=True)  # shadow copies are never shown
    served(registry, 1, ask("q7"), "Other expert.", thumbs=False, expert="classify")

    report = export_preferences(registry, "summarize", tmp_path / "prefs.jsonl")
    assert [(p.prompt, p.chosen, p.rejected) for p in report.pairs] == [("q7", "Best.", "Worst.")]
    assert report.dropped == Counter(
        {NO_CONTENT: 1, NOT_CHAT: 1, EMPTY_ANSWER: 1, NO_PAIR: 1, SAME_ANSWER: 2, TIE: 2, NOT_COMPARABLE: 2,
         DUPLICATE: 1}
    )  # fmt: skip
    assert set(report.dropped) <= set(DROP_REASONS)
    assert (report.rated, report.used) == (13, 2)
    assert report.rated == report.used + sum(report.dropped.values())


def test_max_pairs_per_prompt_keeps_the_largest_gaps_then_the_earliest(
    registry: Registry, tmp_path: Path
) -> None:
    for reward, text in [(0.0, "A."), (1.0, "B."), (5.0, "C."), (2.0, "D.")]:  # 6 pairs for "busy"
        served(registry, 1, ask("busy"), text, reward=reward)
    served(registry, 1, ask("quiet"), "Up.", thumbs=True)
    served(registry, 2, ask("quiet"), "Down.", thumbs=False)

    report = export_preferences(registry, "summarize", tmp_path / "all.jsonl", min_gap=0.5)
    assert len(report.pairs) == 7
    capped = export_preferences(
        registry, "summarize", tmp_path / "capped.jsonl", min_gap=0.5, max_pairs_per_prompt=2
    )
    assert [(p.prompt, p.chosen, p.rejected) for p in capped.pairs] == [
        ("busy", "C.", "A."),  # gap 5
        ("busy", "C.", "B."),  # gap 4
        ("quiet", "Up.", "Down."),  # under the cap: kept
    ]
    assert capped.dropped == Counter({CAPPED: 1}) and capped.used == 5  # "D." is only in capped pairs
    assert capped.rated == capped.used + sum(capped.dropped.values())

    tied = export_preferences(
        registry, "summarize", tmp_path / "one.jsonl", min_gap=0.5, max_pairs_per_prompt=1
    )
    assert [(p.chosen, p.rejected) for p in tied.pairs] == [("C.", "A."), ("Up.", "Down.")]
    with pytest.raises(ValueError, match="max_pairs_per_prompt"):
        export_preferences(registry, "summarize", tmp_path / "x.jsonl", max_pairs_per_prompt=-1)


def test_experiment_limits_the_pairs_to_its_arms(registry: Registry, tmp_path: Path) -> None:
    first = registry.start_experiment("summarize", [(1, 50), (2, 50)], metric="thumbs")
    served(registry, 1, ask("q"), "Arm one, first run.", thumbs=False, experiment_id=first.id)
    served(registry, 2, ask("q"), "Arm two, first run.", thumbs=True, experiment_id=first.id)
    registry.stop_experiment("summarize")
    second = registry.start_experiment("summarize", [(1, 50), (2, 50)], metric="thumbs")
    served(registry, 1, ask("q"), "Arm one, second run.", thumbs=False, experiment_id=second.id)
    served(registry, 2, ask("q"), "Arm two, second run.", thumbs=True, experiment_id=second.id)

    only_first = export_preferences(registry, "summarize", tmp_path / "a.jsonl", experiment_id=first.id)
    assert [(p.chosen, p.rejected) for p in only_first.pairs] == [
        ("Arm two, first run.", "Arm one, first run.")
    ]
    assert only_first.pairs[0].meta["experiment_id"] == first.id and only_first.rated == 2
    everything = export_preferences(registry, "summarize", tmp_path / "b.jsonl")
    assert everything.rated == 4 and len(everything.pairs) == 4  # both ups beat both downs, across runs

    other = registry.start_experiment("classify", [(1, 50), (2, 50)], metric="thumbs")
    with pytest.raises(ValidationError, match=f"experiment {other.id} is an experiment of classify"):
        export_preferences(registry, "summarize", tmp_path / "c.jsonl", experiment_id=other.id)
    with pytest.raises(NotFoundError):
        export_preferences(registry, "nosuchexpert", tmp_path / "c.jsonl")
    assert not (tmp_path / "c.jsonl").exists()


def test_cli_prints_pairs_and_drop_reasons(registry: Registry, tmp_path: Path) -> None:
    served(registry, 1, ask("q"), "Long and chatty answer.", thumbs=False)
    served(registry, 2, ask("q"), "Short.", thumbs=True)
    served(registry, 2, ask("q"), "Short.", thumbs=True, content=False)
    common = ["--registry-url", registry.url, "--store-dir", str(tmp_path / "store")]
    out = tmp_path / "prefs.jsonl"

    result = CliRunner().invoke(moea, ["feedback", "export", "summarize", "--out", str(out), *common])
    assert result.exit_code == 0, result.output
    assert f"wrote 1 pair(s) to {out}" in result.output
    assert "3 rated answer(s) of summarize: 2 in pairs, 1 dropped" in result.output
    assert f"dropped, {NO_CONTENT}: 1" in result.output
    assert len(read_preferences(out)) == 1

    missing = tmp_path / "none.jsonl"
    args = ["feedback", "export", "classify", "--out", str(missing), "--min-gap", "0.5", *common]
    result = CliRunner().invoke(moea, args)
    assert result.exit_code == 1 and "no preference pairs for classify: nothing written" in result.output
    assert not missing.exists()
    result = CliRunner().invoke(
        moea, ["feedback", "export", "summarize", "--out", str(out), "--min-gap", "-1", *common]
    )
    assert result.exit_code == 2 and "--min-gap" in result.output

    served(registry, 1, ask("q"), "A third answer.", thumbs=False)  # q now makes two pairs
    args = ["feedback", "export", "summarize", "--out", str(out), "--max-pairs-per-prompt", "1", *common]
    result = CliRunner().invoke(moea, args)
    assert result.exit_code == 0 and f"wrote 1 pair(s) to {out}" in result.output
    assert f"dropped, {CAPPED}: 1" in result.output
    result = CliRunner().invoke(moea, [*args[: -len(common) - 1], "-1", *common])
    assert result.exit_code == 2 and "--max-pairs-per-prompt" in result.output
