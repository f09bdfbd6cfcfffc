"""`moea registry promote` with the eval gate (moe_adapters/eval_gate.py).

The plain command in registry/cli.py moves the alias without evaluating (the registry cannot run models);
the command line root (serving/cli_root.py) mounts this one into the `registry` group in its place.
"""

from __future__ import annotations

from pathlib import Path

import click

from registry.cli import registry_url_option, store_dir_option
from registry.errors import user_facing_errors

from .eval_gate import DEFAULT_MARGIN, gated_promote
from .eval_types import EvalSettings


@click.command("promote")
@click.argument("ref")
@click.option("--alias", default="prod", show_default=True, help="Alias to point at REF.")
@click.option("--reason", default="", help="Recorded in the alias history (with the gate's verdict).")
@click.option(
    "--margin",
    default=DEFAULT_MARGIN,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Refuse when REF scores below the alias's current holder by more than this (absolute, headline metric).",
)
@click.option(
    "--force", is_flag=True, help="Promote even when the eval gate refuses (recorded in the history)."
)
@click.option(
    "--max-new-tokens",
    default=EvalSettings.max_new_tokens,
    show_default=True,
    help="Greedy tokens per golden answer.",
)
@registry_url_option
@store_dir_option
def gated_promote_command(
    ref: str,
    alias: str,
    reason: str,
    margin: float,
    force: bool,
    max_new_tokens: int,
    registry_url: str | None,
    store_dir: Path | None,
) -> None:
    """Point NAME@ALIAS at the version REF (e.g. `summarize@3`) if it passes the eval gate.

    REF and the alias's current holder are scored on the expert's newest golden set (`moea registry
    attach-eval`; greedy answers from vLLM, cached per version and golden set), or else compared on
    the scores `moea register` recorded from eval.json. REF is refused when it scores below the holder
    by more than --margin, unless --force."""
    from registry.service import Registry

    with user_facing_errors():
        registry = Registry(registry_url, store_dir)
        try:
            settings = EvalSettings(max_new_tokens=max_new_tokens)
            view, decision = gated_promote(
                registry, ref, alias, margin=margin, force=force, reason=reason, settings=settings
            )
        finally:
            registry.close()
        if not decision.passed:
            click.echo(f"forced: {decision.note}")
        else:
            click.echo(decision.note)
        click.echo(f"{view.name}@{alias} → {view.ref}")
