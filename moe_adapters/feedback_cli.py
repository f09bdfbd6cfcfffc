"""`moea feedback …`: preference data from live traffic (moe_adapters/feedback_export.py)."""

from __future__ import annotations

from pathlib import Path

import click

from registry.cli import registry_url_option, store_dir_option
from registry.errors import user_facing_errors

from .feedback_export import DROP_REASONS, ExportReport, export_preferences


@click.group("feedback")
def feedback_group() -> None:
    """Feedback from served traffic (`moea serve --log-content`) as training data."""


@feedback_group.command("export")
@click.argument("name")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Preference JSONL to write."
)
@click.option(
    "--experiment", "experiment_id", type=int, default=None, help="Only the arms of this A/B experiment (id)."
)
@click.option(
    "--min-gap",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Smallest reward difference that makes one answer preferred (thumbs: up over down).",
)
@click.option(
    "--max-pairs-per-prompt",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Keep at most this many pairs per prompt (largest reward gap first, then earliest); 0: no cap.",
)
@registry_url_option
@store_dir_option
def export_command(
    name: str,
    out: Path,
    experiment_id: int | None,
    min_gap: float,
    max_pairs_per_prompt: int,
    registry_url: str | None,
    store_dir: Path | None,
) -> None:
    """Write preference pairs {prompt|messages, chosen, rejected, meta…} for expert NAME to --out.

    Pairs come from rated answers whose content `moea serve --log-content` logged: the same client
    messages answered twice (two arms, or one version twice) with different texts, the better-rated answer
    chosen. Prints how many pairs were written and why the other rated answers were dropped; writes nothing
    (and exits 1) when no pair could be built."""
    from registry.service import Registry

    with user_facing_errors():
        registry = Registry(registry_url, store_dir)
        try:
            report = export_preferences(
                registry,
                name,
                out,
                experiment_id=experiment_id,
                min_gap=min_gap,
                max_pairs_per_prompt=max_pairs_per_prompt,
            )
        finally:
            registry.close()
    click.echo(summary(report, name))
    if not report.pairs:
        raise click.ClickException(f"no preference pairs for {name}: nothing written to {out}")


def summary(report: ExportReport, name: str) -> str:
    """What the export did, one line per count."""
    head = f"wrote {len(report.pairs)} pair(s) to {report.path}" if report.path else "wrote no pairs"
    lines = [
        head + (f" (sha256 {report.sha256[:12]})" if report.sha256 else ""),
        f"{report.rated} rated answer(s) of {name}: {report.used} in pairs, "
        f"{sum(report.dropped.values())} dropped",
    ]
    lines += [
        f"  dropped, {reason}: {report.dropped[reason]}" for reason in DROP_REASONS if report.dropped[reason]
    ]
    return "\n".join(lines)
