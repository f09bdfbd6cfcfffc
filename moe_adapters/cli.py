"""The training side of the `moea` command line: `moea base prepare` and `moea train`.

A thin layer that parses, calls the typed functions, and prints. The `moea` group itself is composed
one layer up, in `serving/cli_root.py`, so this package never imports the serving layer. Heavy
libraries (torch, transformers) are imported inside the commands that need them, so `moea --help`
and the registry commands start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from registry.cli import registry_url_option, store_dir_option
from registry.errors import user_facing_errors

from .config import SINGLE_ADAPTER_BUDGETS


def _parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--set train.max_steps=20` pairs → {"train.max_steps": 20} with YAML-typed values."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE (example: --set train.max_steps=20)")
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides


@click.group("base")
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


@click.command("train")
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
    help="Continue from the checkpoint in --out after a crash (with --dpo: its latest DPO checkpoint, same "
    "inputs only). Without one (new or empty --out) training "
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
@click.option(
    "--sweep",
    "sweep_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Hyper-parameter search per expert (sweep YAML: method grid|random, params lr / r / steps): every "
    "expert's trials train alone with early stopping, the lowest validation loss wins; --out gets the "
    "winners in experts/ plus sweep.json, sweep.md and sweep.png. Rerun with the same --out to continue.",
)
@click.option(
    "--dpo",
    "dpo_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Preference tuning: continue the --from version's LoRA with DPO on this preference JSONL "
    "(prompt/messages, chosen, rejected); settings in the mixture's dpo: section. Writes a run dir with "
    "that one expert.",
)
@click.option(
    "--from",
    "from_ref",
    default=None,
    metavar="NAME@ALIAS|NAME@VERSION",
    help="With --dpo: the registered version to start from; it is also the frozen DPO reference.",
)
@click.option(
    "--dpo-heldout",
    type=click.Path(path_type=Path),
    default=None,
    help="With --dpo: preference pairs never trained on; metrics.json reports their preference accuracy "
    "before and after.",
)
@registry_url_option
@store_dir_option
def train(
    mixture: Path,
    out_dir: Path,
    resume: bool,
    single_adapter: bool,
    budget: str,
    overrides: tuple[str, ...],
    sweep_path: Path | None,
    dpo_file: Path | None,
    from_ref: str | None,
    dpo_heldout: Path | None,
    registry_url: str | None,
    store_dir: Path | None,
) -> None:
    """Train one LoRA expert per task of MIXTURE (YAML) and the router, into a run dir; with --dpo, tune one
    registered expert on preference pairs instead."""
    if dpo_file is not None or from_ref is not None or dpo_heldout is not None:
        _check_dpo_options(dpo_file, from_ref, single_adapter or sweep_path is not None)
        from .dpo import train_dpo

        assert dpo_file is not None and from_ref is not None
        with user_facing_errors():  # bad pairs, an unknown --from ref: `Error: …`, exit 1, nothing written
            run_dir = train_dpo(
                mixture,
                out_dir,
                dpo_file,
                from_ref,
                heldout_path=dpo_heldout,
                registry_url=registry_url,
                store_dir=store_dir,
                overrides=_parse_overrides(overrides),
                resume=resume,
            )
        click.echo(f"run dir: {run_dir}")
        return
    from .train import train_mixture

    if sweep_path is not None:
        if single_adapter or resume:
            raise click.UsageError(
                "--sweep trains experts and continues by itself: drop --single-adapter/--resume"
            )
        from .sweep_run import sweep_mixture

        click.echo(
            f"run dir: {sweep_mixture(mixture, sweep_path, out_dir, overrides=_parse_overrides(overrides))}"
        )
        return
    run_dir = train_mixture(
        mixture,
        out_dir,
        resume=resume,
        single_adapter=single_adapter,
        budget=budget,
        overrides=_parse_overrides(overrides),
    )
    click.echo(f"run dir: {run_dir}")


def _check_dpo_options(dpo_file: Path | None, from_ref: str | None, other_mode: bool) -> None:
    """--dpo needs --from (and the reverse); it does not combine with --single-adapter or --sweep."""
    if dpo_file is None:
        raise click.UsageError("--from and --dpo-heldout need --dpo PREFS.jsonl (the preference pairs)")
    if from_ref is None:
        raise click.UsageError(
            "--dpo needs --from NAME@ALIAS (e.g. --from sentiment@prod): the registered version to tune"
        )
    if other_mode:
        raise click.UsageError("--dpo tunes one registered expert: drop --single-adapter and --sweep")
