"""Export a registered expert version out of moea: as a plain PEFT adapter folder, or merged into its base.

- ``export_peft``: the adapter files exactly as the registry holds them, plus a model card ``README.md``
  and ``moea.json`` (base model, task, metrics, data/mixture hash, registry ref and sha256, system prompt).
- ``export_merged``: the version's base model (resolved as ``moea serve`` does: the version's recorded
  ``base_model`` through :func:`moe_adapters.base_model.resolve_base_model`, or an explicit override) with
  the LoRA merged in by PEFT's ``merge_and_unload``, saved in the base's own dtype (bf16 for the embedded
  SmolLM2) with its tokenizer and chat template: a standalone Hugging Face model that ``transformers`` and
  vLLM load without PEFT. Card and ``moea.json`` as above.

The system prompt. A merged model has no gateway and no router in front of it, so nothing applies the
expert's system prompt (:mod:`moe_adapters.prompting`) any more. We record it (and its policy) in the card
and in ``moea.json``, and clients must send it as the first system message themselves. We deliberately do
not bake it into the chat template: templates are base-specific Jinja, an edited one would silently
diverge from the policy rule the gateway applies to a client's own system message, and a client that
already sends the prompt would get it twice.

Writes are atomic: everything goes to a temporary sibling folder that is renamed onto ``out`` at the end;
an existing non-empty ``out`` is refused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.views import ExpertVersionView

from .prompting import PromptSpec, version_prompt_spec

EXPORT_FORMATS = ("peft", "merged")
MANIFEST_NAME = "moea.json"
CARD_NAME = "README.md"


class ExportError(Exception):
    """An export cannot be written (existing output folder, unknown format, bad base model)."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    out: Path
    format: str
    ref: str
    base_model: str
    dtype: str | None
    """Saved weight dtype of a merged model (None for a PEFT adapter export)."""
    files: tuple[str, ...]


def export_manifest(
    view: ExpertVersionView, *, fmt: str, base_model: str, dtype: str | None = None
) -> dict[str, Any]:
    """The ``moea.json`` written next to an export: where it came from and what clients must send."""
    spec = version_prompt_spec(view)
    return {
        "format_version": 1,
        "export_format": fmt,
        "ref": view.ref,
        "name": view.name,
        "version": view.version,
        "sha256": view.sha256,
        "aliases": list(view.aliases),
        "task_kind": view.task_kind,
        "base_model": base_model,
        "registered_base_model": view.base_model,
        "base_model_name": view.base_model_name,
        "base_model_sha256": view.base_model_sha256,
        "mixture_sha256": view.mixture_sha256,
        "git_commit": view.git_commit,
        "metrics": view.metrics,
        "dtype": dtype,
        "system_prompt": spec.system_prompt if spec else None,
        "prompt_policy": spec.policy if spec else None,
        "files": {f.relpath: {"sha256": f.sha256, "size": f.size} for f in view.files},
    }


def _prompt_section(spec: PromptSpec | None, fmt: str) -> list[str]:
    if spec is None:
        return [
            "## System prompt",
            "",
            "This expert has no system prompt of its own: send messages as they are.",
            "",
        ]
    where = (
        "the merged model has no moea gateway in front of it"
        if fmt == "merged"
        else ("outside the moea gateway nothing adds it for you")
    )
    rule = {
        "if-absent": "Send it as the first system message unless you send a system message of your own.",
        "prepend": "Always send it first in the system message; put your own system text after it (one blank line).",
        "never": "The expert was trained without it: send messages as they are.",
    }[spec.policy]
    return [
        "## System prompt (clients must send it)",
        "",
        f"The expert was trained with this system prompt (policy `{spec.policy}`); {where}. {rule}",
        "It is not baked into the chat template; it is also in `moea.json` (`system_prompt`).",
        "",
        "```text",
        spec.system_prompt or "",
        "```",
        "",
    ]


def model_card(view: ExpertVersionView, *, fmt: str, base_model: str, dtype: str | None = None) -> str:
    """The README.md model card of an export (markdown with a YAML header the Hub understands)."""
    kind = "a standalone model: the LoRA merged into its base" if fmt == "merged" else "a PEFT LoRA adapter"
    header = ["---", f"base_model: {json.dumps(view.base_model_name or base_model)}", "library_name: "
              + ("transformers" if fmt == "merged" else "peft"), "tags:", "- moea", "- lora", "---", ""]  # fmt: skip
    lines = [
        *header,
        f"# {view.name}@{view.version}",
        "",
        f"Exported from the moea registry as {kind}.",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| registry ref | `{view.ref}` |",
        f"| registry sha256 | `{view.sha256}` |",
        f"| task kind | {view.task_kind} |",
        f"| base model | `{base_model}` |",
        f"| base model name | {view.base_model_name or '-'} |",
        f"| base model sha256 | `{view.base_model_sha256 or '-'}` |",
        f"| data/mixture sha256 | `{view.mixture_sha256 or '-'}` |",
        f"| git commit | `{view.git_commit or '-'}` |",
    ]
    if dtype:
        lines.append(f"| weights dtype | {dtype} (the base model's own dtype) |")
    lines += ["", *_prompt_section(version_prompt_spec(view), fmt), "## Metrics", ""]
    lines += ["```json", json.dumps(view.metrics, indent=2, sort_keys=True, default=str), "```", ""]
    if fmt == "merged":
        lines += ["## Use", "", "Load with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` or serve with",
                  "`vllm serve DIR`; no PEFT needed. Apply the chat template (saved with the tokenizer).", ""]  # fmt: skip
    else:
        lines += ["## Use", "", "`peft.PeftModel.from_pretrained(base, DIR)`, or vLLM `--enable-lora --lora-modules",
                  f"{view.name}=DIR` on the base model `{base_model}`.", ""]  # fmt: skip
    return "\n".join(lines)


def _refuse_taken(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder: choose a new --out")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` renamed onto it when the block succeeds (removed otherwise).

    Refuses an ``out`` that exists and is not an empty folder, before anything is written.
    """
    out = Path(out).expanduser().absolute()
    _refuse_taken(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder otherwise
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_metadata(
    folder: Path, view: ExpertVersionView, *, fmt: str, base_model: str, dtype: str | None
) -> None:
    (folder / CARD_NAME).write_text(model_card(view, fmt=fmt, base_model=base_model, dtype=dtype))
    manifest = export_manifest(view, fmt=fmt, base_model=base_model, dtype=dtype)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def _copy_adapter(source: Path, target: Path) -> None:
    """Copy the adapter files (contents only: the store's read-only modes stay behind)."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            dest = target / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)


def _listing(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))


def _version(registry: Any, ref: str) -> ExpertVersionView:
    """The version ``ref`` names, with its file list (``resolve`` leaves the files out)."""
    view = registry.resolve(ref)
    return registry.get_version(view.name, view.version)


def export_peft(registry: Any, ref: str, out: Path | str) -> ExportResult:
    """Write the adapter of ``ref`` (``name@version|alias``) as a plain PEFT folder + README.md + moea.json."""
    view = _version(registry, ref)
    source = registry.artifact_path(view)
    out = Path(out).expanduser().absolute()
    with staged_output(out) as staging:
        _copy_adapter(source, staging)
        _write_metadata(staging, view, fmt="peft", base_model=view.base_model, dtype=None)
        files = _listing(staging)
    return ExportResult(out, "peft", view.ref, view.base_model, None, files)


def merge_adapter(base_model: str, adapter_dir: Path) -> tuple[Any, Any]:
    """(merged model, tokenizer): the base in its own dtype with the LoRA folded in (``merge_and_unload``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    except OSError as error:
        raise ExportError(
            f"cannot load base model {base_model!r} ({str(error).splitlines()[0]}): pass --base-model DIR"
        ) from error
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged, AutoTokenizer.from_pretrained(base_model)


def export_merged(registry: Any, ref: str, out: Path | str, *, base_model: str | None = None) -> ExportResult:
    """Write ``ref`` merged into its base as a standalone HF model (+ tokenizer, chat template, card, moea.json).

    ``base_model`` overrides the version's recorded base (as ``moea serve --base-model`` does), e.g. when the
    recorded folder lives on another machine; it must be the same weights the adapter was trained on.
    """
    from .base_model import resolve_base_model

    out = Path(out).expanduser().absolute()
    _refuse_taken(out)  # before the slow base resolution and merge
    view = _version(registry, ref)
    adapter_dir = registry.artifact_path(view)
    resolved = resolve_base_model(base_model or view.base_model)
    merged, tokenizer = merge_adapter(resolved, adapter_dir)
    dtype = str(merged.dtype).removeprefix("torch.")
    with staged_output(out) as staging:
        merged.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        _write_metadata(staging, view, fmt="merged", base_model=resolved, dtype=dtype)
        files = _listing(staging)
    return ExportResult(out, "merged", view.ref, resolved, dtype, files)
