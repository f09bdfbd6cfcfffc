"""The A/B report as text (rich tables or markdown) and as a PNG plot (matplotlib)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .report import ABReport
from .sequential import SEQUENTIAL_MIN_UNITS
from .stats import MeanCI

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["ARM_HEADERS", "COMPARISON_HEADERS", "plot_report", "render_report"]


def _fmt(value: float, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _fmt_ci(ci: MeanCI) -> str:
    if ci.n == 0:
        return "–"
    if not math.isfinite(ci.low):
        return _fmt(ci.mean)
    return f"{_fmt(ci.mean)} [{_fmt(ci.low)}, {_fmt(ci.high)}]"


def _arm_rows(report: ABReport) -> list[list[str]]:
    rows = []
    total_units = sum(arm.units for arm in report.arms) or 1
    for index, arm in enumerate(report.arms + ([report.shadow] if report.shadow else [])):
        role = "shadow" if arm.shadow else ("control" if index == 0 else "treatment")
        observed = "–" if arm.shadow else f"{arm.units / total_units:.1%}"
        rows.append(
            [
                arm.ref,
                role,
                "–" if arm.shadow else f"{arm.weight:.1%}",
                observed,
                str(arm.requests),
                str(arm.users),
                str(arm.errors),
                _fmt(arm.latency_p50_ms, 4),
                _fmt(arm.latency_p95_ms, 4),
                str(arm.prompt_tokens),
                str(arm.completion_tokens),
                str(arm.metric.n),
                _fmt_ci(arm.metric),
            ]
        )
    return rows


def _comparison_rows(report: ABReport) -> list[list[str]]:
    rows = []
    for comparison in report.comparisons:
        result, sequential = comparison.result, comparison.sequential
        name = f"{report.expert}@{comparison.treatment} vs @{comparison.control}"
        mde = f"±{_fmt(comparison.mde, 3)} / ±{_fmt(comparison.mde_sequential, 3)}"
        if sequential is None:
            always_valid = ["–", f"waiting for {SEQUENTIAL_MIN_UNITS} units per arm"]
        else:
            always_valid = [
                f"{sequential.p_value:.3g}",
                f"[{sequential.ci_low:+.4g}, {sequential.ci_high:+.4g}] ({sequential.looks} looks)",
            ]
        if result is None:
            rows.append([name, "–", "not enough outcomes", "–", *always_valid, mde, "–", "no"])
            continue
        rows.append(
            [
                name,
                f"{result.difference:+.4g} [{result.ci_low:+.4g}, {result.ci_high:+.4g}]",
                f"{result.test}: {_fmt(result.statistic, 4)}"
                + (f" (df {result.df:.1f})" if result.df else ""),
                f"{result.p_value:.3g}",
                *always_valid,
                mde,
                f"{comparison.alpha:.3g}",
                "yes" if comparison.significant else "no",
            ]
        )
    return rows


ARM_HEADERS = [
    "Arm",
    "Role",
    "Weight",
    "Observed",
    "Requests",
    "Users",
    "Errors",
    "p50 ms",
    "p95 ms",
    "Tokens in",
    "Tokens out",
    "Outcomes",
    "Mean [95% CI]",
]
COMPARISON_HEADERS = [
    "Comparison",
    "Difference [95% CI]",
    "Test",
    "p (one look)",
    "Always-valid p",
    "Confidence sequence",
    "MDE now (fixed / seq.)",
    "alpha",
    "Significant",
]


def _method_line(report: ABReport) -> str:
    """How the comparison was made: the unit, the verdict and the MDE's terms."""
    unit = (
        "per user (each user's mean outcome is one sample; a request without a user id is its own unit)"
        if report.unit == "user"
        else "per request (every outcome is one sample)"
    )
    if report.verdict == "sequential":
        verdict = (
            f"Significant = always-valid p < alpha (mSPRT, normal mixture, mixing sd {report.mixing_sd:g} per-unit "
            "SD): safe to check at any time and stop at the first 'significant'"
        )
    else:
        verdict = "Significant = fixed-horizon p < alpha: valid for a single look at a planned sample size"
    return f"Analysis {unit}. {verdict}. MDE: smallest difference found with power 0.8 at the current sample."


def _summary_lines(report: ABReport) -> list[str]:
    started = report.started_at.isoformat(timespec="seconds") if report.started_at else "?"
    status = report.status + (
        f", winner {report.expert}@{report.winner}" if report.winner is not None else ""
    )
    srm = report.srm
    srm_line = f"Sample ratio: chi²={_fmt(srm.chi2, 3)}, p={srm.p_value:.3g} → " + (
        f"MISMATCH (p < {srm.alpha:g})" if srm.flagged else "ok"
    )
    if report.other_requests:
        srm_line += f"; {report.other_requests} requests on versions outside the arms were left out"
    return [
        f"Experiment {report.experiment_id} on {report.expert} ({status}; started {started}; "
        f"metric {report.metric} per {report.unit}; verdict {report.verdict}; salt {report.salt!r})",
        srm_line,
        f"Recommendation: {report.recommendation.text}",
    ]


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_report(report: ABReport, *, markdown: bool = False, width: int = 160) -> str:
    """The report as text: rich tables (terminal) or, with ``markdown=True``, GitHub-flavoured markdown."""
    title, srm_line, recommendation = _summary_lines(report)
    if markdown:
        parts = [f"## A/B report: {title}", _markdown_table(ARM_HEADERS, _arm_rows(report))]
        if report.comparisons:
            parts.append(_markdown_table(COMPARISON_HEADERS, _comparison_rows(report)))
            parts.append(_method_line(report))
        parts += [f"Note: {note}" for note in report.notes]
        parts += [f"**{srm_line}**" if report.srm.flagged else srm_line, f"**{recommendation}**"]
        return "\n\n".join(parts) + "\n"

    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)
    arms_table = Table(title=title, title_justify="left")
    for header in ARM_HEADERS:
        arms_table.add_column(header, justify="left" if header in ("Arm", "Role") else "right", no_wrap=True)
    for row in _arm_rows(report):
        arms_table.add_row(*row)
    console.print(arms_table)
    if report.comparisons:
        tests_table = Table()
        for header in COMPARISON_HEADERS:
            tests_table.add_column(header)
        for row in _comparison_rows(report):
            tests_table.add_row(*row)
        console.print(tests_table)
        console.print(_method_line(report), soft_wrap=True)
    for note in report.notes:
        console.print(f"Note: {note}", soft_wrap=True)
    console.print(srm_line, soft_wrap=True)
    console.print(recommendation, soft_wrap=True)
    return buffer.getvalue()


def plot_report(report: ABReport, path: str | Path) -> Path:
    """Write a PNG: per-arm mean with its 95% CI (left) and configured vs observed traffic (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot: no global state, safe off the main thread
    metric_axes, split_axes = figure.subplots(1, 2)
    labels = [
        f"@{arm.version}" + (" (control)" if index == 0 else "") for index, arm in enumerate(report.arms)
    ]
    positions = np.arange(len(report.arms))
    _plot_metric_per_arm(metric_axes, report, positions, labels)
    _plot_traffic_split(split_axes, report, positions, labels)
    figure.suptitle(
        f"A/B experiment {report.experiment_id}: {report.expert} — {report.recommendation.decision}"
    )
    figure.savefig(path, dpi=120)
    return path


def _plot_metric_per_arm(axes: Axes, report: ABReport, positions: np.ndarray, labels: list[str]) -> None:
    """Each arm's mean with its confidence interval; the winner in green, the control's mean dashed."""
    means = np.array([arm.metric.mean for arm in report.arms], dtype=float)
    lows = np.array([arm.metric.low for arm in report.arms], dtype=float)
    highs = np.array([arm.metric.high for arm in report.arms], dtype=float)
    errors = np.nan_to_num(np.vstack([means - lows, highs - means]), nan=0.0)
    colors = ["tab:gray"] + ["tab:blue"] * (len(report.arms) - 1)
    if report.recommendation.winner is not None and report.recommendation.decision == "winner":
        colors = [
            "tab:green" if arm.version == report.recommendation.winner else color
            for arm, color in zip(report.arms, colors, strict=True)
        ]
    axes.errorbar(positions, means, yerr=errors, fmt="none", ecolor="black", capsize=6)
    axes.scatter(positions, means, c=colors, s=60, zorder=3)
    if math.isfinite(means[0]):
        axes.axhline(means[0], color="tab:gray", linestyle="--", linewidth=1)
    axes.set_xticks(
        positions, [f"{label}\nn={arm.metric.n}" for label, arm in zip(labels, report.arms, strict=True)]
    )
    axes.set_xlim(-0.6, len(report.arms) - 0.4)
    axes.set_ylabel("thumbs-up rate" if report.metric == "thumbs" else "mean reward")
    axes.set_title(f"{report.metric} per arm (95% CI)")


def _plot_traffic_split(axes: Axes, report: ABReport, positions: np.ndarray, labels: list[str]) -> None:
    """Configured against observed share of assignment units per arm; red bars under a mismatch."""
    total_units = sum(arm.units for arm in report.arms) or 1
    bar_width = 0.38
    axes.bar(
        positions - bar_width / 2,
        [arm.weight for arm in report.arms],
        bar_width,
        label="configured",
        color="tab:gray",
    )
    axes.bar(
        positions + bar_width / 2,
        [arm.units / total_units for arm in report.arms],
        bar_width,
        label="observed (units)",
        color="tab:red" if report.srm.flagged else "tab:blue",
    )
    axes.set_xticks(positions, labels)
    axes.set_ylim(0, 1)
    axes.set_ylabel("share of assignment units")
    srm_state = "MISMATCH" if report.srm.flagged else "ok"
    axes.set_title(f"traffic split (SRM p={report.srm.p_value:.2g}, {srm_state})")
    axes.legend(loc="upper right", fontsize=8)
