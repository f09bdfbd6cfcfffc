"""The shipped example data, mixtures and client: reproducible, well-formed, and what they claim to be."""

from __future__ import annotations

import ast
import csv
import datetime as dt
import json
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from moe_adapters.config_load import load_mixture

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import make_dataset  # noqa: E402

MIXTURES = [EXAMPLES / "mixture.yaml", EXAMPLES / "hard" / "mixture.yaml"]
TEMPLATED = EXAMPLES / "hard" / "mixture_templates.yaml"


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a JSONL or CSV example file."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # the demo's learning rate is above the recommended range
        return load_mixture(path)


def test_generated_files_match_the_generator() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_dataset.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_generator_is_deterministic_and_seed_sensitive() -> None:
    assert make_dataset.build_files(7) == make_dataset.build_files(7)
    assert make_dataset.build_files(7)["data/math.jsonl"] != make_dataset.build_files(8)["data/math.jsonl"]


@pytest.mark.parametrize("mixture", MIXTURES, ids=["easy", "hard"])
def test_mixture_loads_and_tasks_are_sized_and_disjoint(mixture: Path) -> None:
    config = load(mixture)
    assert len(config.expert_tasks) >= 4
    assert [t.name for t in config.replay_tasks] == ["general"]
    owner: dict[str, str] = {}
    for task in config.tasks:
        rows = [row for f in task.files for row in read_rows(f)]
        assert (30 <= len(rows) <= 60) if task.replay else (300 <= len(rows) <= 400), task.name
        for row in rows:
            assert row["prompt"].strip() and row["response"].strip()
            assert owner.setdefault(row["prompt"], task.name) == task.name, (
                f"prompt in two tasks: {row['prompt']!r}"
            )
        assert len({r["prompt"] for r in rows}) == len(rows), f"{task.name}: duplicate prompts"


def _wording_pattern(template: str) -> re.Pattern[str]:
    """A regex matching any prompt worded with ``template`` (``{input}`` = anything)."""
    return re.compile("(.+)".join(re.escape(part) for part in template.split("{input}")), re.DOTALL)


@pytest.mark.parametrize("mixture", [*MIXTURES, TEMPLATED], ids=["easy", "hard", "hard-templates"])
def test_unseen_wordings_are_held_out_from_training(mixture: Path) -> None:
    """Every unseen row is worded with a held-out instruction that no training wording (shipped or
    template) produces, around an input that no training row of the mixture uses."""
    config = load(mixture)
    training_prompts: set[str] = set()
    for task in config.expert_tasks:
        for row in (r for f in task.files for r in read_rows(f)):
            training_prompts.add(row["prompt"])  # for the templated mixture: the raw input
    haystack = "\n\n".join(training_prompts)
    for task in config.expert_tasks:
        assert task.unseen_test_file is not None, task.name
        rows = read_rows(task.unseen_test_file)
        assert len(rows) == make_dataset.UNSEEN_ROWS_PER_TASK and len({r["prompt"] for r in rows}) == len(
            rows
        )
        trained = [
            _wording_pattern(t)
            for t in make_dataset.training_templates(task.name, extra=True)
            if t != "{input}"
        ]
        held_out = [_wording_pattern(t) for t in make_dataset.UNSEEN_WORDINGS[task.name]]
        for row in rows:
            prompt = row["prompt"]
            assert prompt not in training_prompts
            assert not [p.pattern for p in trained if p.fullmatch(prompt)], prompt
            fresh = [m.group(1) for p in held_out if (m := p.fullmatch(prompt))]
            assert fresh, f"{prompt!r} is not worded with an unseen instruction"
            assert all(text not in haystack for text in fresh), f"input of {prompt!r} is used in training"


@pytest.mark.parametrize("mixture", [*MIXTURES, TEMPLATED], ids=["easy", "hard", "hard-templates"])
def test_mixture_data_loads_with_unseen_rows(mixture: Path) -> None:
    """Every row renders within train.max_length and the unseen files load with the task's columns."""
    from transformers import AutoTokenizer

    from moe_adapters.base_model import resolve_base_model
    from moe_adapters.data import load_mixture_data

    config = load(mixture)
    data = load_mixture_data(config, AutoTokenizer.from_pretrained(resolve_base_model()))
    for task in config.expert_tasks:
        assert len(data.tasks[task.name].unseen) == make_dataset.UNSEEN_ROWS_PER_TASK
        used = {r.template.index for r in data.tasks[task.name].train if r.template is not None}
        assert used == (set(range(len(task.templates))) if task.templates else set()), task.name


def test_templated_hard_mixture_renders_raw_inputs_with_its_templates() -> None:
    config = load(TEMPLATED)
    hard = load(MIXTURES[1])
    assert [t.name for t in config.expert_tasks] == [t.name for t in hard.expert_tasks]
    for task in config.expert_tasks:
        assert task.templates == make_dataset.training_templates(task.name, extra=True)
        assert len(task.templates) >= 10
        shipped = {
            r["prompt"]: r["response"] for r in read_rows(EXAMPLES / "hard" / "data" / f"{task.name}.jsonl")
        }
        raw = read_rows(task.files[0])
        assert len({r["prompt"] for r in raw}) == len(raw) >= 250
        for row in raw[:50]:  # the same inputs and answers as the shipped hard set, worded by templates
            worded = [t.replace("{input}", row["prompt"]) for t in task.templates]
            assert any(shipped.get(w) == row["response"] for w in worded), row


def test_at_least_one_task_uses_csv() -> None:
    assert any(f.suffix == ".csv" for t in load(MIXTURES[0]).tasks for f in t.files)


def _check_math(prompt: str, response: str) -> None:
    steps = [s.strip() for s in response.split(";")]
    for step in steps:
        expression, _, value = step.partition("=")
        tree = ast.parse(expression.strip(), mode="eval")
        assert all(
            isinstance(n, ast.Expression | ast.BinOp | ast.Constant | ast.operator) for n in ast.walk(tree)
        )
        assert eval(compile(tree, "<math>", "eval")) == int(value), step  # noqa: S307 - only numbers and operators
    assert re.findall(r"\d+", response)[-1] == value.strip()


def _check_date(prompt: str, response: str) -> None:
    date = dt.date.fromisoformat(response)
    month = make_dataset.MONTHS[date.month - 1]
    assert str(date.year) in prompt and (month in prompt or month[:3] in prompt), (prompt, response)


@pytest.mark.parametrize(
    ("rel", "check"),
    [
        ("data/sentiment.jsonl", lambda p, r: r in {"positive", "negative"}),
        ("data/math.jsonl", _check_math),
        (
            "data/extraction.csv",
            lambda p, r: (
                list(json.loads(r)) == ["name", "age", "city"]
                and json.loads(r)["name"] in p
                and str(json.loads(r)["age"]) in p
                and json.loads(r)["city"] in p
            ),
        ),
        ("data/dates.jsonl", _check_date),
        ("hard/data/triage.jsonl", lambda p, r: r in {"billing", "technical", "account", "shipping"}),
        ("hard/data/tone.jsonl", lambda p, r: r in {"positive", "negative"}),
        ("hard/data/sql.jsonl", lambda p, r: r.startswith("SELECT ") and r.endswith(";")),
        ("hard/data/records.jsonl", lambda p, r: all(str(v) in p for v in json.loads(r).values())),
    ],
)
def test_responses_are_correct_for_their_prompts(rel: str, check) -> None:
    for variant in (rel, rel.replace("data/", "data/unseen/").replace(".csv", ".jsonl")):
        for row in read_rows(EXAMPLES / variant):
            result = check(row["prompt"], row["response"])
            assert result is None or result, (variant, row)


def test_labels_are_balanced() -> None:
    for rel in ("data/sentiment.jsonl", "hard/data/tone.jsonl", "hard/data/triage.jsonl"):
        labels = [row["response"] for row in read_rows(EXAMPLES / rel)]
        counts = {label: labels.count(label) for label in set(labels)}
        assert min(counts.values()) >= 0.6 * max(counts.values()), (rel, counts)


def test_hard_tasks_share_vocabulary() -> None:
    """The hard mixture is hard on purpose: paired tasks talk about the same things."""

    def vocabulary(rel: str) -> set[str]:
        return {
            w for row in read_rows(EXAMPLES / rel) for w in re.findall(r"[a-z]{4,}", row["prompt"].lower())
        }

    for a, b in (("triage", "tone"), ("sql", "records")):
        va, vb = vocabulary(f"hard/data/{a}.jsonl"), vocabulary(f"hard/data/{b}.jsonl")
        assert len(va & vb) / len(va | vb) > 0.3, (a, b)


def test_ood_prompts_are_held_out_from_the_router_training_list() -> None:
    from moe_adapters import ood_prompts

    trained = {p.lower().strip(" ?!.") for p in ood_prompts.OOD_PROMPTS}
    rows = read_rows(EXAMPLES / "ood_prompts.jsonl")
    assert len(rows) >= 50
    assert {row["category"] for row in rows} == {"chitchat", "foreign", "general"}
    assert not [row["prompt"] for row in rows if row["prompt"].lower().strip(" ?!.") in trained]


def test_client_prompts_are_unseen_in_training() -> None:
    import client

    training = {
        row["prompt"]
        for rel in ("data/sentiment.jsonl", "data/math.jsonl", "data/extraction.csv", "data/dates.jsonl")
        for row in read_rows(EXAMPLES / rel)
    }
    fresh = client.fresh_prompts(5)
    assert set(fresh) == {"sentiment", "math", "extraction", "dates"}
    assert all(len(rows) == 5 and not {r["prompt"] for r in rows} & training for rows in fresh.values())


def test_client_exits_nonzero_when_the_server_is_unreachable() -> None:
    with socket.socket() as sock:  # a port nothing listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "client.py"),
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--timeout",
            "5",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "cannot reach" in result.stderr


@pytest.mark.slow
def test_responses_fit_the_token_budget() -> None:
    """Short targets keep a LoRA step cheap: every response is at most 24 base-model tokens."""
    from transformers import AutoTokenizer

    from moe_adapters.base_model import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model())
    for path in [*EXAMPLES.glob("data/**/*.*"), *EXAMPLES.glob("hard/data/**/*.*")]:  # incl. unseen/, raw/
        longest = max(len(tokenizer(row["response"])["input_ids"]) for row in read_rows(path))
        assert longest <= 24, (path.name, longest)
