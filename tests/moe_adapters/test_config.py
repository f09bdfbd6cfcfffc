"""Mixture YAML loading: defaults, relative paths, overrides, and validation messages."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from moe_adapters.config import ConfigError, DatasetSource, RouterSettings
from moe_adapters.config_load import load_mixture, write_resolved_mixture

FIXTURES = Path(__file__).parent / "fixtures"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(tmp_path: Path, **extra) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "t.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    return write_yaml(tmp_path / "mix.yaml", {"tasks": [{"name": "t", "files": ["data/t.jsonl"]}], **extra})


def test_defaults_and_relative_paths(tmp_path):
    config = load_mixture(minimal(tmp_path))
    task = config.tasks[0]
    assert task.files == [(tmp_path / "data" / "t.jsonl").resolve()]
    assert (task.kind, task.prompt_field, task.response_field, task.replay) == (
        "generation",
        "prompt",
        "response",
        False,
    )
    assert (config.splits.train, config.splits.val, config.splits.test) == (0.8, 0.1, 0.1)
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 16, 0.05)
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.train.lr == 2e-4 and config.train.gradient_checkpointing is False
    assert isinstance(config.router, RouterSettings) and config.router.encoder == "auto"


def test_fixture_mixture_loads():
    config = load_mixture(FIXTURES / "mixture.yaml")
    assert [t.name for t in config.expert_tasks] == ["sentiment", "arithmetic"]
    assert [t.name for t in config.replay_tasks] == ["general"]


def test_overrides_dotted_keys_and_task_names(tmp_path):
    config = load_mixture(
        minimal(tmp_path),
        overrides={
            "train.max_steps": 7,
            "tasks.t.kind": "math",
            "tasks.0.system_prompt": "Be brief.",
            "router.epochs": 3,
        },
    )
    assert config.train.max_steps == 7 and config.router.epochs == 3
    assert config.tasks[0].kind == "math" and config.tasks[0].system_prompt == "Be brief."
    with pytest.raises(ConfigError, match="no list item 'nope'"):
        load_mixture(minimal(tmp_path), overrides={"tasks.nope.kind": "math"})


def test_yaml_scientific_notation_string_is_a_float(tmp_path):
    path = minimal(tmp_path)
    path.write_text(path.read_text() + "train: {lr: 1e-4}\n")  # YAML 1.1 reads 1e-4 as a string
    assert load_mixture(path).train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("task_extra", "top_extra", "message"),
    [
        ({"name": "Bad Name"}, {}, "must match"),
        ({"kind": "poetry"}, {}, "'poetry' is not one of"),
        ({"eval_fields": "test_list"}, {}, "eval_fields: expected a list"),
        ({"files": ["data/missing.jsonl"]}, {}, "not found"),
        ({"files": ["data/t.txt"]}, {}, "unsupported file type"),
        ({"replay": True}, {}, "at least one must be an expert"),
        ({"files": []}, {}, r"give files \(data files or save_to_disk folders\) or dataset"),
        ({"files": ["data"]}, {}, "is a folder but no datasets save_to_disk folder"),
        ({"dataset": {"path": "./missing"}}, {}, r"dataset\.path: .*missing not found"),
        ({"dataset": {"path": "data/typo"}}, {}, r"dataset\.path: .*data/typo not found"),  # not a hub id
        ({"dataset": {"path": "parquet"}}, {}, "dataset.data_files: required with the 'parquet' builder"),
        ({"dataset": {"path": "json", "data_files": ["data/none-*.jsonl"]}}, {}, "matches no file"),
        ({"dataset": {"path": "a/b", "data_files": 7}}, {}, "expected a string or a list or a mapping"),
        ({"dataset": {"path": "a/b", "splt": "test"}}, {}, "unknown key"),
        ({"colour": "red"}, {}, "unknown key"),
        ({}, {"sampling": {"temperature": 0}}, "sampling.temperature: must be > 0"),
        ({}, {"splits": {"train": 0.5, "val": 0.1, "test": 0.1}}, "sum to 1"),
        ({}, {"train": {"max_steps": 0}}, "train.max_steps: must be >= 1"),
        ({}, {"train": {"batch_size": "eight"}}, "expected an integer"),
        ({}, {"train": {"replay_share": 1.0}}, "replay_share"),
        ({}, {"router": {"encoder": "bert"}}, "'bert' is not one of"),
        ({}, {"router": {"heads": ["svm"]}}, "router.heads"),
        ({"prompt_policy": "sometimes"}, {}, "'sometimes' is not one of"),
        ({"prompt_policy": "never", "system_prompt": "Be brief."}, {}, "system_prompt would be used nowhere"),
        ({}, {"train": {"long_rows": "cut"}}, "'cut' is not one of"),
    ],
)
def test_validation_errors(tmp_path, task_extra, top_extra, message):
    path = minimal(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["tasks"][0].update(task_extra)
    data.update(top_extra)
    (tmp_path / "data" / "t.txt").write_text("x")
    with pytest.raises(ConfigError, match=message):
        load_mixture(write_yaml(path, data))


def test_all_problems_reported_at_once(tmp_path):
    path = write_yaml(
        tmp_path / "mix.yaml",
        {
            "tasks": [{"name": "A", "files": ["nope.jsonl"]}, {"name": "A", "files": ["nope.jsonl"]}],
            "train": {"lr": -1},
        },
    )
    with pytest.raises(ConfigError) as info:
        load_mixture(path)
    text = str(info.value)
    assert (
        "must match" in text and "used more than once" in text and "not found" in text and "train.lr" in text
    )


def test_learning_rate_outside_range_warns(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_mixture(minimal(tmp_path), overrides={"train.lr": 5e-3})
        load_mixture(minimal(tmp_path), overrides={"train.lr": 1e-3})  # the examples' LoRA rate: no warning
    assert sum("outside the recommended range" in str(w.message) for w in caught) == 1


def test_resolved_mixture_round_trips_with_probabilities(tmp_path):
    config = load_mixture(minimal(tmp_path), overrides={"train.max_steps": 5})
    out = tmp_path / "run" / "mixture.yaml"
    out.parent.mkdir()
    write_resolved_mixture(config, out, {"t": 1.0})
    data = yaml.safe_load(out.read_text())
    assert data["probabilities"] == {"t": 1.0} and data["train"]["max_steps"] == 5
    again = load_mixture(out)  # absolute paths, probabilities ignored
    assert again.tasks[0].files == config.tasks[0].files and again.train.max_steps == 5


def test_dataset_sources_and_save_to_disk_folders(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "p", "response": "r"}]).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"validation": datasets.Dataset.from_list([{"prompt": "p", "response": "r"}])}
    ).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.parquet").write_bytes(b"")
    tasks = [
        {
            "name": "folder",
            "files": ["saved"],
            "val_file": "dict",
            "dataset": {"path": "saved", "split": "train[:1]"},
        },
        {
            "name": "hub",
            "dataset": {"path": "owner/name", "name": "en", "revision": "v1", "data_files": "x/*.json"},
        },
        {"name": "builder", "dataset": {"path": "parquet", "data_files": {"train": ["data/a.parquet"]}}},
    ]
    config = load_mixture(write_yaml(tmp_path / "mix.yaml", {"tasks": tasks}))
    folder, hub, builder = config.tasks
    assert folder.files == [tmp_path / "saved"] and folder.val_file == tmp_path / "dict"
    assert folder.dataset == DatasetSource(str(tmp_path / "saved"), split="train[:1]")
    assert hub.dataset == DatasetSource("owner/name", "en", "train", "x/*.json", "v1")  # the repo's files
    assert builder.dataset.data_files == {"train": [str(tmp_path / "data" / "a.parquet")]}
    assert builder.dataset.label == "dataset:parquet[train]"
    out = tmp_path / "run" / "mixture.yaml"
    out.parent.mkdir()
    write_resolved_mixture(config, out)
    assert [t.dataset for t in load_mixture(out).tasks] == [t.dataset for t in config.tasks]
