"""`moea export --format peft` and the export's card / moea.json on tiny registered adapters (no model loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe_adapters.export import ExportError, export_peft, staged_output
from registry.service import Registry
from registry.store import file_sha256
from serving.cli_root import moea
from tests.registry.helpers import make_run_dir


@pytest.fixture
def registry(tmp_path: Path, registry_url: str) -> Registry:
    reg = Registry(registry_url, tmp_path / "store")
    reg.register_run(make_run_dir(tmp_path / "run", tasks=("summarize", "classify"), router=False))
    yield reg
    reg.close()


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(moea, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_peft_export_is_the_registered_adapter_plus_card(registry: Registry, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = export_peft(registry, "summarize@1", out)
    view = registry.get_version("summarize", 1)
    assert result.out == out and result.format == "peft" and result.dtype is None
    assert set(result.files) == {f.relpath for f in view.files} | {"README.md", "moea.json"}
    for f in view.files:  # byte for byte what the registry holds
        assert file_sha256(out / f.relpath) == f.sha256
    card = (out / "README.md").read_text()
    for needle in ("summarize@1", view.sha256, "cd" * 32, "You summarize.", "best_val_loss", "/models/smollm2",
                   "SmolLM2-135M-Instruct", "library_name: peft", "clients must send it"):  # fmt: skip
        assert needle in card, needle
    manifest = json.loads((out / "moea.json").read_text())
    assert manifest["ref"] == "summarize@1" and manifest["sha256"] == view.sha256
    assert manifest["system_prompt"] == "You summarize." and manifest["prompt_policy"] == "if-absent"
    assert manifest["mixture_sha256"] == "cd" * 32 and manifest["export_format"] == "peft"
    assert manifest["metrics"] == view.metrics and manifest["task_kind"] == "generation"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.tmp-")]


def test_cli_peft_export_by_alias_into_an_empty_folder(
    registry: Registry, tmp_path: Path, registry_url: str
) -> None:
    registry.promote("classify@1", "prod")
    out = tmp_path / "empty"
    out.mkdir()
    code, output = _invoke("export", "classify@prod", "--format", "peft", "--out", str(out),
                           "--registry-url", registry_url, "--store-dir", str(tmp_path / "store"))  # fmt: skip
    assert code == 0, output
    assert "exported classify@1 as PEFT adapter" in output and "system prompt" in output
    assert json.loads((out / "moea.json").read_text())["system_prompt"] == "You classify."
    assert (out / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "peft", "--merge"], "contradict"),
        (["--base-model", "/x"], "--base-model only applies to --merge"),
        (["--merge"], "base model folder /models/smollm2 does not exist"),
        ([], "already exists and is not an empty folder"),
    ],
)
def test_cli_refusals_are_one_line_and_write_nothing(
    registry: Registry, tmp_path: Path, registry_url: str, extra: list[str], message: str
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    target = out if not extra else tmp_path / "new"
    code, output = _invoke("export", "summarize@1", "--out", str(target), *extra,
                           "--registry-url", registry_url, "--store-dir", str(tmp_path / "store"))  # fmt: skip
    assert code == 1 and output.startswith("Error: ") and output.count("\n") == 1, output
    assert message in output
    assert not (tmp_path / "new").exists() and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_unknown_ref_is_a_one_line_error(registry: Registry, tmp_path: Path, registry_url: str) -> None:
    code, output = _invoke("export", "nope@1", "--out", str(tmp_path / "o"),
                           "--registry-url", registry_url, "--store-dir", str(tmp_path / "store"))  # fmt: skip
    assert code == 1 and output.startswith("Error: ") and output.count("\n") == 1, output


def test_staged_output_leaves_nothing_when_the_write_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(out) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    file_out = tmp_path / "file"
    file_out.write_text("x")
    with pytest.raises(ExportError, match="not an empty folder"), staged_output(file_out):
        pass


def test_merged_card_names_the_dtype_and_prompt_rules(registry: Registry) -> None:
    from dataclasses import replace

    from moe_adapters.export import model_card

    view = registry.get_version("summarize", 1)
    card = model_card(view, fmt="merged", base_model="/base", dtype="bfloat16")
    assert "bfloat16 (the base model's own dtype)" in card and "library_name: transformers" in card
    assert "no moea gateway" in card and "not baked into the chat template" in card
    prepend = replace(view, config={"task": {"prompt_policy": "prepend"}})
    assert "Always send it first" in model_card(prepend, fmt="merged", base_model="/base")
    bare = replace(view, system_prompt=None)
    assert "no system prompt of its own" in model_card(bare, fmt="peft", base_model="/base")
