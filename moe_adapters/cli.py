"""The `moea` command line: a thin layer that parses, calls the typed functions, and prints.

Heavy libraries (torch, transformers, vLLM) are imported inside the commands that need them, so
`moea --help` and the registry commands start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import yaml

from registry.cli import register_command, registry_group
from serving.ab.cli import ab_group
from serving.cli import serve_command

from .config import SINGLE_ADAPTER_BUDGETS
from .errors import user_facing_errors


def _parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--set train.max_steps=20` pairs → {"train.max_steps": 20} with YAML-typed values."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE (example: --set train.max_steps=20)")
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moea")
def moea() -> None:
    """Train LoRA experts per task, route between them, register and serve them."""


@moea.group("base")
def base_group() -> None:
    """The base model every expert is trained on."""


@base_group.command("prepare")
@click.option(
    "--base", "base_spec", default=None, help="HF folder or hub id (default: embedded SmolLM2-135M)."
)
def base_prepare(base_spec: str | None) -> None:
    """Convert the embedded base model once into $MOEA_HOME (no-op when already there)."""
    from .base_model import resolve_base_model

    click.echo(resolve_base_model(base_spec))


@moea.command("train")
@click.argument("mixture", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run dir to write (experts/, router/, metrics.json, …).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the checkpoint in --out after a crash. Without one (new or empty --out) training "
    "starts from step 0 and says so, so job scripts can always pass it; a finished run (run.json) is "
    "refused, never retrained.",
)
@click.option(
    "--single-adapter",
    is_flag=True,
    help="Train one LoRA on all tasks together (the multi-task baseline) instead of one per task.",
)
@click.option(
    "--budget",
    type=click.Choice(SINGLE_ADAPTER_BUDGETS),
    default="total",
    show_default=True,
    help="With --single-adapter: 'total' trains train.max_steps steps (the experts' run's total: equal "
    "steps and about equal tokens); 'per-expert' trains train.max_steps / number of expert tasks (the "
    "steps one expert gets on average). Recorded in metrics.json and run.json.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a mixture setting, e.g. --set train.max_steps=50 (repeatable).",
)
def train(
    mixture: Path, out_dir: Path, resume: bool, single_adapter: bool, budget: str, overrides: tuple[str, ...]
) -> None:
    """Train one LoRA expert per task of MIXTURE (YAML) and the router, into a run dir."""
    from .train import train_mixture

    run_dir = train_mixture(
        mixture,
        out_dir,
        resume=resume,
        single_adapter=single_adapter,
        budget=budget,
        overrides=_parse_overrides(overrides),
    )
    click.echo(f"run dir: {run_dir}")


moea.add_command(register_command)
moea.add_command(registry_group)
moea.add_command(serve_command)
moea.add_command(ab_group)


def _mount_optional_commands() -> None:
    """Commands living in modules that import heavier dependencies are mounted here."""
    from .demo import demo_command
    from .eval_cli import eval_command

    moea.add_command(eval_command)
    moea.add_command(demo_command)


_mount_optional_commands()


def main() -> None:
    """Console entry point: run the group, turning known errors into one-line messages."""
    with user_facing_errors():
        moea.main(standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
