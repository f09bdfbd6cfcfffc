"""Golden sets and cached eval scores in the registry (registry/golden.py), real SQLite + artifact store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_run_dir

from registry.cli import main
from registry.errors import ValidationError
from registry.golden import parse_golden
from registry.service import Registry

ROWS = [
    {"prompt": "2+2?", "response": "4"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3+3?"},
                  {"role": "assistant", "content": "6"}]},
    {"messages": [{"role": "user", "content": "4+4?"}], "reference": "8", "references": ["8", "eight"]},
]  # fmt: skip


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_rows_like_the_task_data_are_parsed_into_messages_reference_and_extras() -> None:
    rows = parse_golden("\n".join(json.dumps(r) for r in ROWS).encode())
    assert rows[0] == {"messages": [{"role": "user", "content": "2+2?"}], "reference": "4", "extra": {}}
    assert rows[1]["messages"][0]["role"] == "system" and rows[1]["reference"] == "6"
    assert rows[2]["reference"] == "8" and rows[2]["extra"] == {"references": ["8", "eight"]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no rows"),
        ('{"prompt": "x"}', "line 1: a row needs the answer"),
        ('{"response": "x"}', "line 1: a row needs a non-empty 'prompt'"),
        ("[1]", "line 1: a row must be a JSON object"),
        ('{"prompt": "a", "response": "b"}\nnot json', "line 2:"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
         '"reference": "c"}', "must end with a user turn"),
    ],
)  # fmt: skip
def test_bad_golden_files_are_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        parse_golden(text.encode(), "g.jsonl")
    assert "\n" not in str(caught.value)


def test_attach_versions_golden_sets_by_content(registry: Registry, tmp_path: Path) -> None:
    registry.register_run(make_run_dir(tmp_path / "run"))
    first, created = registry.attach_golden("summarize", _jsonl(tmp_path / "g1.jsonl", ROWS))
    assert created and first.version == 1 and first.rows == 3
    assert first.sha256 == hashlib.sha256((tmp_path / "g1.jsonl").read_bytes()).hexdigest()
    again, created = registry.attach_golden("summarize", tmp_path / "g1.jsonl")
    assert not created and again.version == 1  # same content: nothing new
    second, created = registry.attach_golden("summarize", _jsonl(tmp_path / "g2.jsonl", ROWS[:2]))
    assert created and second.version == 2
    assert [g.version for g in registry.golden_sets("summarize")] == [1, 2]
    assert registry.current_golden("summarize") == second and registry.current_golden("classify") is None
    assert [r["reference"] for r in registry.golden_rows(second)] == ["4", "6"]
    # The file is an artifact in the store: gc keeps it, verify checks it.
    registry.gc(grace_s=0)
    assert registry.golden_rows(first)[2]["reference"] == "8" and registry.verify().problems == []


def test_eval_scores_are_cached_per_version_and_golden_hash(registry: Registry, tmp_path: Path) -> None:
    registry.register_run(make_run_dir(tmp_path / "run1"))
    registry.register_run(make_run_dir(tmp_path / "run2", seed=1))
    golden, _ = registry.attach_golden("summarize", _jsonl(tmp_path / "g.jsonl", ROWS))
    assert registry.eval_score("summarize", 2, golden.sha256) is None
    probes = [{"messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "max_tokens": 8}]
    stored = registry.record_eval_score(
        "summarize", 2, golden.sha256, {"metric": "rougeL", "score": 0.5, "n": 3, "probes": probes}
    )
    assert (stored.metric, stored.score, stored.n, stored.probes) == ("rougeL", 0.5, 3, probes)
    # A second record for the same (version, golden hash) keeps the first one.
    kept = registry.record_eval_score(
        "summarize", 2, golden.sha256, {"metric": "rougeL", "score": 0.9, "n": 3}
    )
    assert kept.score == 0.5 and registry.eval_score("summarize", 2, golden.sha256).score == 0.5  # type: ignore[union-attr]
    assert registry.golden_probes("summarize", 2).probes == probes  # type: ignore[union-attr]
    assert registry.golden_probes("summarize", 1) is None
    # A newer golden set the version was not scored on: its old probes are still what the gateway checks.
    registry.attach_golden("summarize", _jsonl(tmp_path / "g2.jsonl", ROWS[:1]))
    assert registry.golden_probes("summarize", 2).golden_sha256 == golden.sha256  # type: ignore[union-attr]
    assert [(s.version, s.score) for s in registry.eval_scores("summarize")] == [(2, 0.5)]
    with pytest.raises(ValidationError, match="needs metric, score and n"):
        registry.record_eval_score("summarize", 1, golden.sha256, {"score": 1})


def test_register_records_the_headline_eval_score(registry: Registry, tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run")
    evaluation = {"tasks": {"summarize": {"kind": "generation", "n": 30, "systems": {
        "base": {"metric": "rougeL", "score": 0.2}, "oracle": {"metric": "rougeL", "score": 0.61}}}}}  # fmt: skip
    (run / "eval.json").write_text(json.dumps(evaluation))
    views = {v.name: v for v in registry.register_run(run).experts}
    assert views["summarize"].metrics["eval_score"] == {
        "metric": "rougeL", "score": 0.61, "n": 30, "system": "oracle", "split": "test"
    }  # fmt: skip
    assert "eval_score" not in views["classify"].metrics  # no eval entry for it


def test_cli_attach_eval_and_show(isolated_home: Path, tmp_path: Path) -> None:
    def run(*args: str) -> str:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / "eval.json").write_text(json.dumps(
        {"tasks": {"summarize": {"n": 30, "systems": {"oracle": {"metric": "rougeL", "score": 0.61}}}}}))  # fmt: skip
    run("register", str(run_dir))
    golden = _jsonl(tmp_path / "golden.jsonl", ROWS)
    assert "golden set v1 attached: 3 rows" in run("registry", "attach-eval", "summarize", str(golden))
    assert "unchanged" in run("registry", "attach-eval", "summarize", str(golden))
    show = run("registry", "show", "summarize")
    assert "rougeL=0.61 (n=30, test)" in show
    assert "golden set v1 (used by promote): golden.jsonl, 3 rows" in show and "no version scored yet" in show
    bad = CliRunner().invoke(
        main, ["registry", "attach-eval", "summarize", str(_jsonl(tmp_path / "b.jsonl", [{"x": 1}]))]
    )
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and bad.output.count("\n") == 1
