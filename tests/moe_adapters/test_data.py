"""Data loading: every bad row reported with file and line, duplicates counted, deterministic splits,
Hugging Face datasets as sources (save_to_disk folders, ``dataset:``), and chat templating with
response-only labels (splits: test_data_rows.py; batches: test_data_batches.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moe_adapters.base_model import resolve_base_model
from moe_adapters.config import DatasetSource, SplitConfig
from moe_adapters.config_load import load_mixture
from moe_adapters.data import load_mixture_data
from moe_adapters.data_rows import DataValidationError, Row
from moe_adapters.data_sources import describe_dataset_error, read_dataset, read_saved_dataset
from moe_adapters.data_tokenize import IGNORE_INDEX, render_prompt

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base_model(None))


def mixture(tmp_path: Path, tasks: list[dict], **train) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks, "train": {"max_length": 64, **train}}))
    return path


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_all_bad_rows_reported_with_file_and_line(tmp_path, tokenizer):
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"prompt": "fine", "response": "ok"},
            {"prompt": "no response here"},  # line 2: missing field
            "",  # blank line 3 is skipped, numbering continues
            {"prompt": "   ", "response": "x"},  # line 4: empty prompt
            {"prompt": "long " * 200, "response": "x"},  # line 5: too long
            {"prompt": "fine again", "response": "ok"},
            '{"prompt": "broken json"',  # line 7
        ],
    )
    (tmp_path / "b.csv").write_text("question,answer\nhello,world\n,empty prompt\nok,fine\n")
    path = mixture(
        tmp_path,
        [
            {"name": "a", "files": ["a.jsonl"]},
            {"name": "b", "files": ["b.csv"], "prompt_field": "question", "response_field": "answer"},
        ],
    )
    with pytest.raises(DataValidationError) as info:
        load_mixture_data(load_mixture(path), tokenizer)
    problems = info.value.problems
    text = str(info.value)
    assert f"{tmp_path / 'a.jsonl'}:line 2: missing field 'response'" in text
    assert f"{tmp_path / 'a.jsonl'}:line 4: field 'prompt' is empty" in text
    assert f"{tmp_path / 'a.jsonl'}:line 5:" in text and "train.max_length=64" in text
    assert f"{tmp_path / 'a.jsonl'}:line 7: invalid JSON" in text
    assert f"{tmp_path / 'b.csv'}:line 3: missing field 'question'" in text
    assert len(problems) == 5, problems


def test_text_is_kept_verbatim(tmp_path, tokenizer):
    # pyarrow would turn an all-dates column into timestamps; pandas would turn "007" into 7 and "NA" into NaN.
    write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"day {i}", "response": f"2024-03-0{i}"} for i in range(1, 8)]
    )
    (tmp_path / "c.csv").write_text("prompt,response,n\nzero,007,1\nmissing,NA,2\nfloat,1.50,3\n")
    path = mixture(
        tmp_path,
        [{"name": "d", "files": ["d.jsonl"]}, {"name": "c", "files": ["c.csv"]}],
        **{},
    )
    data = load_mixture_data(load_mixture(path), tokenizer)
    rows = {r.prompt: r.response for t in data.tasks.values() for r in t.train + t.val + t.test}
    assert rows["day 3"] == "2024-03-03"
    assert (rows["zero"], rows["missing"], rows["float"]) == ("007", "NA", "1.50")


def test_eval_fields_carried_in_row_extra(tmp_path, tokenizer):
    asserts = ["assert f(1) == 2", "assert f(2) == 3"]
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": f"task {i}", "response": "def f(x): return x + 1", "test_list": asserts}
            for i in range(4)
        ],
    )
    write_jsonl(
        tmp_path / "test.jsonl",
        [
            {"prompt": "t1", "response": "r1", "test_list": asserts, "test_setup_code": "", "task_id": 7},
            {"prompt": "t2", "response": "r2", "test_setup_code": None},  # no tests: extra stays empty
        ],
    )
    task = {"name": "code", "files": ["train.jsonl"], "test_file": "test.jsonl", "kind": "code"}
    path = mixture(tmp_path, [{**task, "eval_fields": ["test_list", "test_setup_code"]}])
    test_rows = load_mixture_data(load_mixture(path), tokenizer).tasks["code"].test
    assert [r.extra for r in test_rows] == [{"test_list": asserts, "test_setup_code": ""}, {}]
    assert test_rows[0] == Row("t1", "r1", test_rows[0].source)  # extra is no part of a row's identity
    plain = load_mixture_data(load_mixture(mixture(tmp_path, [task])), tokenizer).tasks["code"].test
    assert all(r.extra == {} for r in plain)  # only configured columns travel


def test_duplicates_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i % 7}", "response": f"a{i % 7}"} for i in range(20)]  # 7 unique
    write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_mixture_data(
        load_mixture(mixture(tmp_path, [{"name": "d", "files": ["d.jsonl"]}])), tokenizer
    )
    task = data.tasks["d"]
    assert task.rows_loaded == 20 and task.duplicates_dropped == 13
    assert len(task.train) + len(task.val) + len(task.test) == 7
    assert data.duplicates == {"d": 13}


def test_parquet_and_explicit_val_file(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(30)]).to_parquet(
        str(tmp_path / "t.parquet")
    )
    write_jsonl(
        tmp_path / "val.jsonl", [{"prompt": "p0", "response": "r0"}, {"prompt": "v", "response": "w"}]
    )
    path = mixture(tmp_path, [{"name": "t", "files": ["t.parquet"], "val_file": "val.jsonl"}])
    task = load_mixture_data(load_mixture(path), tokenizer).tasks["t"]
    assert [r.prompt for r in task.val] == ["p0", "v"]
    assert "p0" not in {r.prompt for r in task.train + task.test}  # held-out row removed from train
    assert task.duplicates_dropped == 1 and len(task.test) == 3 and len(task.train) == 26


CHAT = [{"role": "user", "content": "When?"}, {"role": "assistant", "content": "2024-03-05"}]


def qa_rows(n: int, tag: str = "") -> list[dict]:
    """Rows with a date-like response column (pyarrow's JSON reader would make it a timestamp) and a chat."""
    return [
        {"prompt": f"{tag}day {i}", "response": f"2024-03-{i + 1:02d}", "messages": CHAT} for i in range(n)
    ]


def all_rows(data) -> dict[str, str]:
    return {r.prompt: r.response for t in data.tasks.values() for r in t.train + t.val + t.test}


def test_save_to_disk_folders_as_files_and_val_file(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list(qa_rows(12)).save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(qa_rows(10, "t")),
            "validation": datasets.Dataset.from_list(qa_rows(3, "v")),
        }
    ).save_to_disk(str(tmp_path / "dict"))
    path = mixture(
        tmp_path,
        [
            {"name": "plain", "files": ["plain"]},
            {"name": "dict", "files": ["dict"], "val_file": "dict"},  # train split / validation split
        ],
    )
    data = load_mixture_data(load_mixture(path), tokenizer)
    assert all_rows(data)["day 11"] == "2024-03-12"  # text kept verbatim
    task = data.tasks["dict"]
    assert sorted(r.prompt for r in task.val) == ["vday 0", "vday 1", "vday 2"]
    assert len(task.train) + len(task.test) == 10 and task.train[0].source == f"{tmp_path / 'dict'}:row 1"
    # Every column comes through; a chat column is a list of {role, content} dicts.
    (where, record), *_ = read_saved_dataset(tmp_path / "dict", "validation")
    assert where == "row 1" and record == {"prompt": "vday 0", "response": "2024-03-01", "messages": CHAT}


def test_dataset_source_parquet_builder(tmp_path, tokenizer):
    import datasets

    (tmp_path / "data").mkdir()
    datasets.Dataset.from_list(qa_rows(10)).to_parquet(str(tmp_path / "data" / "t.parquet"))
    path = mixture(tmp_path, [{"name": "t", "dataset": {"path": "parquet", "data_files": "data/t.parquet"}}])
    config = load_mixture(path)
    assert config.tasks[0].dataset.data_files == str(tmp_path / "data" / "t.parquet")  # relative to YAML
    task = load_mixture_data(config, tokenizer).tasks["t"]
    assert len(task.train + task.val + task.test) == 10
    assert task.train[0].source == "dataset:parquet[train] row 1"
    assert {r.prompt: r.response for r in task.train + task.val + task.test}["day 4"] == "2024-03-05"


def test_dataset_source_local_folder_keeps_text_verbatim(tmp_path, tokenizer):
    import datasets

    # JSON lines: load_dataset would read the dates as timestamps (and fail on test.jsonl's plain text).
    (tmp_path / "jl").mkdir()
    write_jsonl(tmp_path / "jl" / "train.jsonl", qa_rows(8))
    write_jsonl(tmp_path / "jl" / "test.jsonl", [{"prompt": "t", "response": "not a date", "messages": CHAT}])
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(qa_rows(6, "pq")).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    datasets.Dataset.from_list(qa_rows(2, "pqtest")).to_parquet(str(tmp_path / "pq" / "test.parquet"))
    path = mixture(
        tmp_path,
        [
            {"name": "jl", "dataset": {"path": "jl"}},
            {"name": "jltest", "dataset": {"path": "./jl", "split": "test"}},
            {"name": "pq", "dataset": {"path": "pq", "split": "train[:4]+test"}},
        ],
    )
    data = load_mixture_data(load_mixture(path), tokenizer)
    rows = all_rows(data)
    assert rows["day 7"] == "2024-03-08" and rows["t"] == "not a date"
    assert sorted(p for p in rows if p.startswith("pq")) == [f"pqday {i}" for i in range(4)] + [
        "pqtestday 0",
        "pqtestday 1",
    ]
    for folder in ("jl", "pq"):
        records = read_dataset(DatasetSource(str(tmp_path / folder)), text_fields=["prompt", "response"])
        assert records[0][0] == "row 1" and records[0][1]["messages"] == CHAT  # list of dicts, all columns
        assert records[1][1]["response"] == "2024-03-02"


def test_dataset_source_problems_reported_together(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list([{"question": "q", "answer": "a"}] * 3).save_to_disk(str(tmp_path / "qa"))
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(qa_rows(2))}).save_to_disk(str(tmp_path / "dev"))
    write_jsonl(tmp_path / "ok.jsonl", qa_rows(3))
    path = mixture(
        tmp_path,
        [
            {"name": "columns", "dataset": {"path": "qa"}},  # no prompt/response columns
            {"name": "split", "dataset": {"path": "dev", "split": "test"}},
            {"name": "dictfile", "files": ["dev"]},  # a DatasetDict without a train split
            {"name": "hub", "files": ["ok.jsonl"], "dataset": {"path": "someone/not-cached-here"}},
        ],
    )
    with pytest.raises(DataValidationError) as info:
        load_mixture_data(load_mixture(path), tokenizer)
    problems = info.value.problems
    qa = f"dataset:{tmp_path / 'qa'}[train]"
    assert (
        f"{qa}: no column 'prompt' (task columns; columns: answer, question); set prompt_field" in problems[0]
    )
    assert f"{qa}: no column 'response'" in problems[1]
    assert problems[2] == f"dataset:{tmp_path / 'dev'}[test]: unknown split 'test' (splits: dev)"
    assert problems[3].startswith(f"{tmp_path / 'dev'}: a DatasetDict without a 'train' split (splits: dev)")
    assert problems[4].startswith("dataset:someone/not-cached-here[train]: not in the local datasets cache")
    assert "save_to_disk" in problems[4] and len(problems) == 5, problems
    assert all("\n" not in p and "Traceback" not in p for p in problems)


def test_unreachable_hub_is_one_line_with_what_to_do(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    cause = OSError("[Errno -2] Name or service not known")
    try:
        try:
            raise cause
        except OSError as exc:
            raise ConnectionError("Couldn't reach 'a/b' on the Hub (LocalEntryNotFoundError)\nmore") from exc
    except ConnectionError as exc:
        message = describe_dataset_error(exc)
    assert message.startswith("cannot reach the Hugging Face Hub (Couldn't reach 'a/b' on the Hub")
    assert "HF_DATASETS_OFFLINE=1" in message and "save_to_disk" in message and "\n" not in message


def test_chat_template_and_response_only_labels(tokenizer):
    from moe_adapters.data_tokenize import tokenize_rows
    from moe_adapters.prompting import PromptSpec

    problems: list[str] = []
    row = Row("What is 2+2?", "4", "x:line 1")
    spec = PromptSpec("Answer with a number.")
    kept, (example,) = tokenize_rows([row], tokenizer, 128, problems, spec=spec)
    prompt_text = render_prompt(tokenizer, row.client_messages(), spec)
    assert prompt_text.startswith("<|im_start|>system\nAnswer with a number.") and prompt_text.endswith(
        "assistant\n"
    )
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tokenizer.decode(example.labels[n_prompt:]) == "4<|im_end|>"
    assert example.input_ids[-1] == tokenizer.eos_token_id and not problems and kept == [row]
    full = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": row.prompt},
            {"role": "assistant", "content": row.response},
        ],
        tokenize=False,
    )
    assert full.startswith(tokenizer.decode(example.input_ids))  # same text the template produces


def test_messages_rows_multi_turn_loss_on_assistant_turns_only(tmp_path, tokenizer):
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
    rows = [{"messages": conversation}] + [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(9)
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    path = mixture(
        tmp_path, [{"name": "chat", "files": ["chat.jsonl"], "system_prompt": "Be nice."}], max_length=128
    )
    config = load_mixture(path)
    config.splits = SplitConfig(1.0, 0.0, 0.0)
    task = load_mixture_data(config, tokenizer).tasks["chat"]
    (row,) = [r for r in task.train if r.prompt == "And of Spain?"]
    assert row.response == "Madrid." and row.history[0] == ("system", "You are terse.")
    example = task.train_examples[task.train.index(row)]
    learned = [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Paris.<|im_end|>Madrid.<|im_end|>"
    # The row's own system message wins over the task's (policy if-absent), and the ids are the template's.
    text = tokenizer.decode(example.input_ids)
    assert "Be nice." not in text and "You are terse." in text
    assert tokenizer.apply_chat_template(conversation, tokenize=False).startswith(text)
    (plain,) = [r for r in task.train if r.prompt == "q0"]
    plain_text = tokenizer.decode(task.train_examples[task.train.index(plain)].input_ids)
    assert plain_text.startswith("<|im_start|>system\nBe nice.<|im_end|>")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("not a list", "must be a non-empty list"),
        ([{"role": "user", "content": "hi"}], "must end with a user message followed by the assistant"),
        ([{"role": "robot", "content": "hi"}], "role must be one of"),
        (
            [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}],
            "content must be non-empty",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "x"},
            ],
            "a system message may only come first",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "x"},
            ],
            "must alternate",
        ),
    ],
)
def test_bad_messages_rows_reported_with_line(tmp_path, tokenizer, messages, problem):
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "fine", "response": "ok"}, {"messages": messages}])
    with pytest.raises(DataValidationError) as info:
        load_mixture_data(load_mixture(mixture(tmp_path, [{"name": "c", "files": ["c.jsonl"]}])), tokenizer)
    (reported,) = info.value.problems
    assert reported.startswith(f"{tmp_path / 'c.jsonl'}:line 2: field 'messages'")
    assert problem in info.value.problems[0]


def test_long_rows_skip_and_truncate(tmp_path, tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(80)) + " END"
    rows = [{"prompt": f"short {i}", "response": "ok"} for i in range(20)]
    rows += [{"prompt": long_prompt, "response": "long-answer"}, {"prompt": "x", "response": "y " * 200}]
    write_jsonl(tmp_path / "l.jsonl", rows)
    tasks = [{"name": "l", "files": ["l.jsonl"]}]
    with pytest.raises(DataValidationError) as info:  # default: every long row is an error
        load_mixture_data(load_mixture(mixture(tmp_path, tasks, max_length=64)), tokenizer)
    assert len(info.value.problems) == 2 and "train.long_rows" in info.value.problems[0]

    def load(policy: str):
        config = load_mixture(mixture(tmp_path, tasks, max_length=64, long_rows=policy))
        config.splits = SplitConfig(1.0, 0.0, 0.0)
        return load_mixture_data(config, tokenizer).tasks["l"]

    skipped = load("skip")
    assert skipped.long_rows == {"skipped": 2, "truncated": 0} and len(skipped.train) == 20
    cut = load("truncate")
    assert cut.long_rows == {"skipped": 1, "truncated": 1} and len(cut.train) == 21
    (row,) = [r for r in cut.train if r.response == "long-answer"]
    example = cut.train_examples[cut.train.index(row)]
    assert len(example.input_ids) <= 64
    assert row.prompt.endswith("END") and not row.prompt.startswith("word0 ")  # cut from the left
    learned = [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "long-answer<|im_end|>"  # the answer is never cut


def test_chat_dataset_folder_without_prompt_columns(tmp_path, tokenizer):
    """A `save_to_disk` folder holding only a `messages` column (the usual instruction-data shape) loads."""
    import datasets

    chats = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
        for i in range(10)
    ]
    datasets.Dataset.from_list(chats).save_to_disk(str(tmp_path / "chats"))
    task = load_mixture_data(
        load_mixture(mixture(tmp_path, [{"name": "c", "files": ["chats"]}])), tokenizer
    ).tasks["c"]
    rows = task.train + task.val + task.test
    assert sorted(r.prompt for r in rows) == sorted(f"hi {i}" for i in range(10))
    assert all(r.response == r.prompt.replace("hi", "hello") and r.history == () for r in rows)
