"""`moea ab …`: start, inspect, stop and report A/B experiments between versions of one expert.

Thin layer over :mod:`registry.service` (experiments live in the registry database, so every gateway
replica sees the same experiment) and :mod:`serving.ab` (assignment checks, report, rendering, plot).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from registry.cli import registry_url_option
from registry.errors import user_facing_errors
from registry.experiment_metrics import EXPERIMENT_METRICS

from .assign import ABError, parse_arm, validate_arms
from .guardrails import DEFAULT_SETTINGS, parse_guardrail, parse_ramp
from .render import plot_report, render_report
from .report import build_report
from .sequential import DEFAULT_MIXING_SD

if TYPE_CHECKING:
    from registry.service import Registry
    from registry.views import ExperimentView


def _open_registry(url: str | None) -> Registry:
    from registry.service import Registry

    return Registry(url)


def _describe_arms(experiment: ExperimentView) -> str:
    total = sum(arm.weight for arm in experiment.arms) or 1.0
    arms = ", ".join(f"@{arm.version} {arm.weight / total:.0%}" for arm in experiment.arms)
    return arms + (f", shadow @{experiment.shadow_version}" if experiment.shadow_version is not None else "")


@click.group("ab")
def ab_group() -> None:
    """A/B experiments: split an expert's traffic between versions, collect feedback, pick a winner."""


# Over 60 lines only because of its click option decorators; the body is short.
@ab_group.command("start")
@click.argument("name")
@click.option(
    "--arm",
    "arm_specs",
    multiple=True,
    required=True,
    metavar="VERSION:WEIGHT",
    help="A version and its traffic weight, e.g. --arm 3:90 --arm 4:10. The first arm is the control.",
)
@click.option(
    "--metric",
    type=click.Choice(EXPERIMENT_METRICS),
    default="reward",
    show_default=True,
    help="Outcome compared: mean reward (Welch t-test) or thumbs-up rate (two-proportion z-test).",
)
@click.option("--salt", default=None, help="Assignment salt (default: chosen by the registry).")
@click.option(
    "--shadow",
    "shadow_version",
    type=click.IntRange(min=1),
    default=None,
    help="Version that receives a copy of the traffic; its answers are logged, never returned.",
)
@click.option(
    "--guardrail",
    "guardrail_specs",
    multiple=True,
    metavar="METRIC<=|>=BOUND",
    help="A limit the treatment must respect, checked by the gateways; a significant breach stops the "
    "experiment and sends all traffic to the control. BOUND: a number (absolute), NUMBERx (times the "
    "control) or +/-NUMBER (control plus). E.g. error_rate<=0.02, p95_latency_ms<=1.2x, thumbs>=-0.05.",
)
@click.option(
    "--guardrail-alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=DEFAULT_SETTINGS["alpha"],
    show_default=True,
    help="Chance of stopping on guardrails that hold, over the whole experiment (always-valid).",
)
@click.option(
    "--guardrail-min-units",
    type=click.IntRange(min=2),
    default=int(DEFAULT_SETTINGS["min_units"]),
    show_default=True,
    help="Users (latency quantiles: requests) each arm needs before its guardrails are judged.",
)
@click.option(
    "--ramp",
    "ramp_text",
    default=None,
    metavar="P1,P2,...",
    help="Treatment share in percent per step, e.g. 1,5,25,50 (two arms; replaces their weights). The "
    "gateways move to the next step while the guardrails hold; users in the treatment stay there.",
)
@click.option(
    "--ramp-step-minutes",
    type=click.FloatRange(0),
    default=DEFAULT_SETTINGS["step_s"] / 60,
    show_default=True,
    help="Shortest duration of a ramp step.",
)
@click.option(
    "--ramp-min-units",
    type=click.IntRange(min=0),
    default=int(DEFAULT_SETTINGS["step_units"]),
    show_default=True,
    help="Treatment users (or requests without a user) a ramp step needs before the next one.",
)
@click.option("--actor", default=None, help="Who starts it, for the audit trail (default: user@host).")
@registry_url_option
def start_command(
    name: str,
    arm_specs: tuple[str, ...],
    metric: str,
    salt: str | None,
    shadow_version: int | None,
    guardrail_specs: tuple[str, ...],
    guardrail_alpha: float,
    guardrail_min_units: int,
    ramp_text: str | None,
    ramp_step_minutes: float,
    ramp_min_units: int,
    actor: str | None,
    registry_url: str | None,
) -> None:
    """Start an experiment on expert NAME.

    From then on, requests for NAME (and routed requests that pick it) are split between the arms,
    sticky per user.
    """
    with user_facing_errors():
        guardrails = [parse_guardrail(spec).text for spec in guardrail_specs]
        ramp = parse_ramp(ramp_text) if ramp_text is not None else []
        if ramp:  # the ramp sets the weights: VERSION alone is enough
            arm_specs = tuple(spec if ":" in spec else f"{spec}:1" for spec in arm_specs)
            if len(arm_specs) != 2:
                raise ABError(f"--ramp needs exactly two --arm (control, treatment), got {len(arm_specs)}")
        arms = [parse_arm(spec) for spec in arm_specs]
        validate_arms(arms)
        if len(arms) < 2 and shadow_version is None:
            raise ABError("an experiment needs two --arm (or one --arm and --shadow VERSION)")
        if shadow_version is not None and shadow_version in {version for version, _ in arms}:
            raise ABError(f"--shadow {shadow_version} is also an arm; shadow a version that is not an arm")
        registry = _open_registry(registry_url)
        experiment = registry.start_experiment(
            name,
            arms,
            metric=metric,
            salt=salt,
            shadow_version=shadow_version,
            actor=actor,
            guardrails=guardrails,
            ramp=ramp,
            guard_settings={
                "alpha": guardrail_alpha,
                "min_units": guardrail_min_units,
                "step_s": ramp_step_minutes * 60,
                "step_units": ramp_min_units,
            },
        )
    click.echo(
        f"started experiment {experiment.id} on {experiment.expert}: {_describe_arms(experiment)}; "
        f"metric {experiment.metric}; salt {experiment.salt!r}"
        + (f"; guardrails {', '.join(experiment.guardrails)}" if experiment.guardrails else "")
        + (f"; ramp {_describe_ramp(experiment)}" if experiment.ramp else "")
    )


def _describe_ramp(experiment: ExperimentView) -> str:
    steps = ",".join(f"{share:g}" for share in experiment.ramp)
    return f"{steps}% (step {experiment.ramp_step + 1}/{len(experiment.ramp)})"


@ab_group.command("status")
@click.argument("name", required=False)
@click.option("--all", "show_all", is_flag=True, help="Include stopped experiments.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@registry_url_option
def status_command(name: str | None, show_all: bool, as_json: bool, registry_url: str | None) -> None:
    """Running experiments (of expert NAME, or of all experts).

    --all adds stopped ones.
    """
    with user_facing_errors():
        registry = _open_registry(registry_url)
        if show_all:
            experiments = registry.list_experiments(name)
        elif name is not None:
            active = registry.active_experiment(name)
            experiments = [active] if active is not None else []
        else:
            experiments = registry.active_experiments()
    if as_json:
        click.echo(json.dumps([_experiment_dict(experiment) for experiment in experiments], indent=2))
        return
    if not experiments:
        click.echo("no experiments" + ("" if show_all else " running") + (f" for {name}" if name else ""))
        return
    click.echo(_status_table(experiments))


@ab_group.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@registry_url_option
@click.pass_context
def list_command(ctx: click.Context, name: str | None, as_json: bool, registry_url: str | None) -> None:
    """All experiments, running and stopped (same as `status --all`)."""
    ctx.invoke(status_command, name=name, show_all=True, as_json=as_json, registry_url=registry_url)


def _experiment_dict(experiment: ExperimentView) -> dict[str, Any]:
    return {
        "id": experiment.id,
        "expert": experiment.expert,
        "status": experiment.status,
        "metric": experiment.metric,
        "arms": [{"version": arm.version, "weight": arm.weight} for arm in experiment.arms],
        "salt": experiment.salt,
        "shadow_version": experiment.shadow_version,
        "started_at": experiment.started_at.isoformat() if experiment.started_at else None,
        "stopped_at": experiment.stopped_at.isoformat() if experiment.stopped_at else None,
        "winner": experiment.winner,
        "guardrails": experiment.guardrails,
        "guard_settings": experiment.guard_settings,
        "ramp": experiment.ramp,
        "ramp_step": experiment.ramp_step,
        "ramp_started": [when.isoformat() for when in experiment.ramp_started],
        "stop_reason": experiment.stop_reason,
    }


def _status_table(experiments: list[ExperimentView]) -> str:
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table()
    for header in ("ID", "Expert", "Status", "Metric", "Arms", "Guardrails", "Started", "Winner"):
        table.add_column(header)
    for experiment in experiments:
        table.add_row(
            str(experiment.id),
            experiment.expert,
            experiment.status,
            experiment.metric,
            _describe_arms(experiment),
            " ".join(
                [*experiment.guardrails, *([f"ramp {_describe_ramp(experiment)}"] if experiment.ramp else [])]
            ),
            experiment.started_at.isoformat(timespec="seconds") if experiment.started_at else "",
            f"@{experiment.winner}" if experiment.winner is not None else "",
        )
    buffer = io.StringIO()
    Console(file=buffer, width=160, color_system=None, highlight=False).print(table)
    reasons = [f"experiment {e.id} stopped: {e.stop_reason}" for e in experiments if e.stop_reason]
    return "\n".join([buffer.getvalue().rstrip("\n"), *reasons])


@ab_group.command("stop")
@click.argument("name")
@click.option(
    "--winner",
    type=click.IntRange(min=1),
    default=None,
    help="Arm version that becomes NAME@prod (the move is kept in the alias history).",
)
@click.option("--actor", default=None, help="Who stops it, for the audit trail (default: user@host).")
@registry_url_option
def stop_command(name: str, winner: int | None, actor: str | None, registry_url: str | None) -> None:
    """Stop the running experiment of expert NAME.

    Requests go back to NAME's prod version; with --winner that version becomes prod first.
    """
    with user_facing_errors():
        registry = _open_registry(registry_url)
        running = registry.active_experiment(name)
        if running is None:
            raise ABError(f"no experiment is running on {name!r}; see `moea ab status`")
        versions = [arm.version for arm in running.arms]
        if winner is not None and winner not in versions:
            raise ABError(f"--winner {winner} is not an arm of experiment {running.id} (arms: {versions})")
        experiment = registry.stop_experiment(name, winner=winner, actor=actor)
    message = f"stopped experiment {experiment.id} on {experiment.expert}"
    if experiment.winner is not None:
        message += f"; winner {experiment.expert}@{experiment.winner} is now {experiment.expert}@prod"
    click.echo(message)


# Over 60 lines only because of its click option decorators; the body is short.
@ab_group.command("report")
@click.argument("experiment")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Markdown report to write; the plot goes next to it as .png "
    "(default: ab_<expert>_<id>.png in the current folder, no markdown).",
)
@click.option(
    "--min-samples",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Samples of the analysis unit (users, or requests) each arm needs before a winner is called.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    help="Significance level (split between treatment arms, Bonferroni).",
)
@click.option(
    "--unit",
    type=click.Choice(["auto", "user", "request"]),
    default="auto",
    show_default=True,
    help="Analysis unit. user: one mean per user (assignment is sticky per user; a request without a "
    "user id is a unit of its own); request: every request with an outcome, anti-conservative when users "
    "send several; auto: user when any request has a user id, else request.",
)
@click.option(
    "--verdict",
    type=click.Choice(["sequential", "fixed"]),
    default="sequential",
    show_default=True,
    help="What decides 'significant'. sequential: always-valid mSPRT, safe to check every hour and stop "
    "at the first 'significant'; fixed: the z/Welch test, valid for one look at a size planned in advance.",
)
@click.option(
    "--mixing-sd",
    type=click.FloatRange(0, min_open=True),
    default=DEFAULT_MIXING_SD,
    show_default=True,
    help="mSPRT mixing standard deviation, in per-unit standard deviations (the effect size it is tuned to).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@registry_url_option
def report_command(
    experiment: str,
    out: Path | None,
    min_samples: int,
    alpha: float,
    unit: str,
    verdict: str,
    mixing_sd: float,
    as_json: bool,
    registry_url: str | None,
) -> None:
    """Per-arm statistics, always-valid sequential test, MDE, SRM check and a recommendation.

    EXPERIMENT is an expert name (its latest experiment) or an experiment id. Prints the tables and
    writes a PNG plot (and, with --out FILE.md, a markdown report next to it).
    """
    with user_facing_errors():
        registry = _open_registry(registry_url)
        report = build_report(
            registry,
            experiment,
            min_samples=min_samples,
            alpha=alpha,
            unit=unit,
            verdict=verdict,
            mixing_sd=mixing_sd,
        )
    if out is not None and out.suffix.lower() != ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_report(report, markdown=True))
        plot_path = out.with_suffix(".png")
    else:
        plot_path = out or Path(f"ab_{report.expert}_{report.experiment_id}.png")
    plot_report(report, plot_path)
    if as_json:
        click.echo(json.dumps(report.to_dict() | {"plot": str(plot_path)}, indent=2))
        return
    click.echo(render_report(report).rstrip("\n"))
    written = [str(out)] if out is not None and out != plot_path else []
    click.echo("wrote " + ", ".join([*written, str(plot_path)]))
