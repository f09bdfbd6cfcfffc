"""Instruction templates: validation messages, files, deterministic per-row draws, and the data hook."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml

from moe_adapters.config import ConfigError
from moe_adapters.config_load import load_mixture, write_resolved_mixture
from moe_adapters.data import _load_files, load_mixture_data
from moe_adapters.router_step import router_prompts
from moe_adapters.templates import (
    TemplateChoice,
    TemplateError,
    read_templates_file,
    render_all,
    render_row,
    template_index,
    template_problem,
    validate_templates,
)

TEMPLATES = ["Classify: {input}", "{input}\nSentiment:", 'Is "{input}" positive? Reply as {{"label": ...}}']


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("Review: {input}", None),
        ("{input} and again {input}", None),
        ('JSON like {{"a": 1}} for {input}', None),
        ("Review: {text}", "placeholder(s) {text}"),
        ("Review: {0}", "placeholder(s) {0}"),
        ("Review: {}", "placeholder(s) {}"),
        ("Review: {input!r}", "conversion or format spec"),
        ("Review: {input:>10}", "conversion or format spec"),
        ('JSON like {"a": 1} for {input}', "placeholder(s)"),
        ("Review: {input", "literal braces as {{ and }}"),
        ("Review: input}", "literal braces as {{ and }}"),
        ("Review with no input", "no {input} placeholder"),
        ("   ", "is empty"),
        (7, "must be a string"),
    ],
)
def test_template_problems(template, problem) -> None:
    found = template_problem(template)
    assert (found is None) if problem is None else (problem in found), found


def test_validate_templates_names_each_bad_template_and_rejects_empty_lists() -> None:
    assert validate_templates(TEMPLATES) == []
    assert validate_templates([]) == [
        "must be a non-empty list of strings, each with the placeholder {input}"
    ]
    problems = validate_templates(["ok {input}", "bad {text}", "none"])
    assert len(problems) == 2 and problems[0].startswith("[1] 'bad {text}'") and problems[1].startswith("[2]")


def test_render_keeps_braces_in_the_input_and_literal_braces_in_the_template() -> None:
    prompt, choice = render_row([TEMPLATES[2]], "t", "a {weird} input")
    assert prompt == 'Is "a {weird} input" positive? Reply as {"label": ...}'
    assert choice == TemplateChoice(0, "a {weird} input")
    assert render_row(None, "t", "raw") == ("raw", None) and render_row([], "t", "raw") == ("raw", None)
    assert render_all(TEMPLATES[:2], "x") == ["Classify: x", "x\nSentiment:"]


def test_template_draw_is_deterministic_per_row_and_spreads_over_templates() -> None:
    inputs = [f"review number {i}" for i in range(300)]
    draws = [template_index(3, "tone", x) for x in inputs]
    assert draws == [template_index(3, "tone", x) for x in reversed(inputs)][::-1]  # order-free
    counts = [draws.count(k) for k in range(3)]
    assert min(counts) > 60, counts  # roughly uniform
    assert draws != [template_index(3, "triage", x) for x in inputs]  # seeded by the task too


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("t.yaml", "# comment\n- 'A: {input}'\n- \"{input}\\nB\"\n"),
        ("t.yml", "templates:\n  - 'A: {input}'\n  - \"{input}\\nB\"\n"),
        ("t.json", json.dumps(["A: {input}", "{input}\nB"])),
        ("t.txt", "# one template per line\nA: {input}\n\n{input}\\nB\n"),
    ],
)
def test_templates_files(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    assert read_templates_file(tmp_path / name) == ["A: {input}", "{input}\nB"]


def test_templates_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="not found"):
        read_templates_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(TemplateError, match="cannot be parsed"):
        read_templates_file(tmp_path / "bad.yaml")
    (tmp_path / "map.yaml").write_text("a: b\n")
    with pytest.raises(TemplateError, match="expected a list of strings"):
        read_templates_file(tmp_path / "map.yaml")


# ------------------------------------------------------------------------------- mixture + data hook


def _mixture(tmp_path: Path, **task) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    rows = [{"input": f"the thing number {i} was great", "response": "positive"} for i in range(40)]
    (data / "tone.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "unseen.jsonl").write_text(
        json.dumps({"input": "Fresh wording {input}?", "response": "negative"}) + "\n"
    )
    spec = {"name": "tone", "files": ["data/tone.jsonl"], "prompt_field": "input", **task}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"tasks": [spec], "splits": {"seed": 3}}))
    return path


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"templates": []}, "templates: must be a non-empty list"),
        ({"templates": ["A {input}", "B {text}"]}, r"templates\[1\] 'B \{text\}' has placeholder"),
        ({"templates": "A {input}"}, "expected a list"),
        ({"templates_file": "nope.yaml"}, "templates_file: templates file .* not found"),
        ({"templates": ["A {input}"], "templates_file": "t.yaml"}, "not both"),
        ({"unseen_test_file": "nope.jsonl"}, "nope.jsonl not found"),
    ],
)
def test_mixture_template_validation(tmp_path: Path, task: dict, message: str) -> None:
    (tmp_path / "t.yaml").write_text("- 'A {input}'\n")
    with pytest.raises(ConfigError, match=message):
        load_mixture(_mixture(tmp_path, **task))


def test_templates_file_is_read_into_the_resolved_mixture(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("- 'A {input}'\n- '{input} B'\n")
    config = load_mixture(_mixture(tmp_path, templates_file="t.yaml"))
    assert config.tasks[0].templates == ["A {input}", "{input} B"] and config.tasks[0].templates_file is None
    write_resolved_mixture(config, tmp_path / "run.yaml")
    (tmp_path / "t.yaml").write_text("- 'changed {input}'\n")  # the run keeps what it was trained with
    assert load_mixture(tmp_path / "run.yaml").tasks[0].templates == ["A {input}", "{input} B"]


def test_rows_are_rendered_deterministically_and_unseen_rows_are_kept_verbatim(tmp_path: Path) -> None:
    config = load_mixture(_mixture(tmp_path, templates=TEMPLATES, unseen_test_file="data/unseen.jsonl"))
    task = config.tasks[0]
    problems: list[str] = []
    rows = _load_files(task, task.files, problems)
    assert not problems and all(r.template is not None for r in rows)
    for row in rows:
        assert row.prompt == TEMPLATES[row.template.index].format(input=row.template.input)
    assert len({r.template.index for r in rows}) == 3
    shuffled = tmp_path / "data" / "reversed.jsonl"
    shuffled.write_text("".join(reversed(task.files[0].read_text().splitlines(keepends=True))))
    again = _load_files(task, [shuffled], problems)  # a row's wording does not depend on its position
    assert {r.template.input: r.prompt for r in again} == {r.template.input: r.prompt for r in rows}
    data = load_mixture_data(config, _tokenizer()).tasks["tone"]
    assert [r.prompt for r in data.unseen] == ["Fresh wording {input}?"] and data.unseen[0].template is None
    rendered = router_prompts(data, data.train[:2])
    assert len(rendered) == 2 * len(TEMPLATES)
    assert rendered[: len(TEMPLATES)] == render_all(TEMPLATES, data.train[0].template.input)


def test_untemplated_rows_are_unchanged(tmp_path: Path) -> None:
    config = load_mixture(_mixture(tmp_path))
    data = load_mixture_data(config, _tokenizer()).tasks["tone"]
    assert all(r.template is None and r.prompt.startswith("the thing") for r in data.train)
    assert router_prompts(data, data.train) == [r.prompt for r in data.train] and data.unseen == []


@functools.cache
def _tokenizer():
    """The embedded base model's tokenizer (the real chat template the rows are rendered with)."""
    from transformers import AutoTokenizer

    from moe_adapters.base_model import resolve_base_model

    return AutoTokenizer.from_pretrained(resolve_base_model(None))
