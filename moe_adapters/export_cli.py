"""`moea export`: a registered expert version as a plain PEFT folder or merged into its base (moe_adapters/export.py)."""

from __future__ import annotations

from pathlib import Path

import click

from registry.cli import registry_url_option, store_dir_option
from registry.errors import user_facing_errors


@click.command("export", short_help="Export a registered version as a PEFT adapter folder or a merged model.")
@click.argument("ref")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Folder to write (must not exist, or be empty); written atomically.")  # fmt: skip
@click.option("--merge", is_flag=True, help="Merge the LoRA into its base model (same as --format merged).")
@click.option("--format", "fmt", type=click.Choice(["peft", "merged"]), default=None,
              help="peft: the adapter folder + model card (default); merged: a standalone HF model.")  # fmt: skip
@click.option("--base-model", default=None, metavar="DIR|ID",
              help="With --merge: the base to merge into instead of the version's recorded one (same weights).")  # fmt: skip
@registry_url_option
@store_dir_option
def export_command(
    ref: str,
    out: Path,
    merge: bool,
    fmt: str | None,
    base_model: str | None,
    registry_url: str | None,
    store_dir: Path | None,
) -> None:
    """Export REF (e.g. `summarize@3` or `summarize@prod`) out of the registry into --out.

    --format peft writes the adapter files as registered plus README.md (model card) and moea.json.
    --merge writes a standalone Hugging Face model (base + LoRA via PEFT merge_and_unload, in the base's
    dtype, with tokenizer and chat template) that transformers and vLLM load without PEFT. The expert's
    system prompt is not baked in: it is in README.md and moea.json, and clients must send it."""
    from registry.service import Registry

    from .export import ExportError, export_merged, export_peft

    with user_facing_errors():
        if merge and fmt == "peft":
            raise ExportError("--merge and --format peft contradict each other: give one")
        merged = merge or fmt == "merged"
        if base_model and not merged:
            raise ExportError("--base-model only applies to --merge")
        registry = Registry(registry_url, store_dir)
        try:
            if merged:
                result = export_merged(registry, ref, out, base_model=base_model)
            else:
                result = export_peft(registry, ref, out)
        finally:
            registry.close()
        what = f"merged model ({result.dtype}, base {result.base_model})" if merged else "PEFT adapter"
        click.echo(f"exported {result.ref} as {what} to {result.out} ({len(result.files)} files)")
        click.echo(
            "note: clients must send the expert's system prompt themselves (see README.md / moea.json)"
        )
