"""eval.md and `moea eval --compare` as markdown: score tables (test split, unseen wordings, per template),
general set, router confusion, error analysis, training compute, and two evals side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .eval_compute import EXPERT_SYSTEMS
from .eval_types import SYSTEM_ORDER, system_rank
from .metrics import PRIMARY_METRIC


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _score_table(section: dict[str, Any], abstain_header: str = "abstain") -> list[str]:
    """The per-task table of one section (test split or unseen wordings) with its mean row."""
    systems = sorted({s for t in section["tasks"].values() for s in t["systems"]}, key=system_rank)
    lines = [
        "| task | kind | n | " + " | ".join(systems) + f" | moe/oracle | router acc | {abstain_header} |",
        "|---" * (len(systems) + 6) + "|",
    ]
    summary = section["summary"]
    for name, t in section["tasks"].items():
        cells = [_fmt(t["systems"].get(s, {}).get("score")) for s in systems]
        lines.append(
            f"| {name} | {t['kind']} | {t['n']} | "
            + " | ".join(cells)
            + f" | {_fmt(summary['moe_vs_oracle'].get(name))} | {_fmt(t.get('router_accuracy'))} "
            f"| {_fmt(t['abstain_rate'])} |"
        )
    lines.append(
        "| **mean** | | | "
        + " | ".join(_fmt(summary["mean_score"].get(s)) for s in systems)
        + f" | {_fmt(summary['moe_vs_oracle_mean'])} | {_fmt(section['router']['accuracy'])} "
        f"| {_fmt(section['router']['abstain_rate'])} |"
    )
    return lines


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def paired_lines(paired: dict[str, Any] | None) -> list[str]:
    """eval.md section: every system minus the reference per task and on the mean, with the interval."""
    if not paired or not paired["systems"]:
        return []
    tasks = list(next(iter(paired["systems"].values()))["tasks"])
    level = round(100 * paired["level"])
    lines = [
        "",
        f"## Paired differences vs {paired['reference']} ({level}% bootstrap interval over test rows)",
        "",
        f"Each system's headline score minus {paired['reference']}'s on the same rows; the interval resamples "
        f"rows ({paired['resamples']:,} draws, the same draw for both systems; the mean resamples each task "
        "on its own). An interval that holds 0 is no evidence of a difference.",
        "",
        "| system | " + " | ".join(tasks) + " | **mean** |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for system, diffs in paired["systems"].items():
        cells = []
        for entry in [diffs["tasks"].get(t) for t in tasks] + [diffs["mean"]]:
            cells.append(
                "–"
                if entry is None
                else f"{_signed(entry['diff'])} [{_signed(entry['ci_low'])}, {_signed(entry['ci_high'])}]"
            )
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return lines


def _robustness_lines(report: dict[str, Any]) -> list[str]:
    """eval.md section: test rows worded with instructions no training row uses, and OOD prompts."""
    unseen, ood = report.get("unseen"), report.get("ood")
    lines = []
    if unseen and unseen["tasks"]:
        router = unseen["router"]
        lines += [
            "",
            "## Unseen wordings (robustness)",
            "",
            "Each task's `unseen_test_file`: test rows worded with instructions that no training row uses. "
            "→ base: share the router sent to the base model.",
            "",
            *_score_table(unseen, "→ base"),
            "",
            f"Routing accuracy {_fmt(router['accuracy'])}, routed = {_fmt(unseen['summary']['moe_vs_oracle_mean'])}"
            f" of oracle, → base {_fmt(router['abstain_rate'])}, wrong routes among accepted "
            f"{_fmt(router['wrong_route_rate'])} (in-template test split: routing "
            f"{_fmt(report['router']['accuracy'])}, routed = {_fmt(report['summary']['moe_vs_oracle_mean'])} "
            "of oracle).",
        ]
    if ood:
        categories = ", ".join(
            f"{name} {_fmt(c['to_base_rate'])} (n={c['n']})" for name, c in ood["by_category"].items()
        )
        lines += [
            "",
            f"Out-of-distribution prompts (mixture `ood_test_file`) sent to the base model: "
            f"{_fmt(ood['to_base_rate'])} of {ood['n']} ({categories}).",
        ]
    return lines


def _template_lines(report: dict[str, Any]) -> list[str]:
    """eval.md section: per-template scores of templated tasks (test rows grouped by their drawn template)."""
    templated = {name: t["templates"] for name, t in report["tasks"].items() if t.get("templates")}
    if not templated:
        return []
    systems = sorted(
        {s for groups in templated.values() for g in groups.values() for s in g["scores"]}, key=system_rank
    )
    lines = [
        "",
        "## Per-template scores (test split, each row in the wording drawn for it)",
        "",
        "| task | # | template | n | " + " | ".join(systems) + " | router acc | abstain |",
        "|---" * (len(systems) + 6) + "|",
    ]
    for name, groups in templated.items():
        for index, g in groups.items():
            text = (g.get("template") or "").replace("\n", "⏎").replace("|", "\\|")
            text = text if len(text) <= 60 else text[:57] + "…"
            lines.append(
                f"| {name} | {index} | `{text}` | {g['n']} | "
                + " | ".join(_fmt(g["scores"].get(s)) for s in systems)
                + f" | {_fmt(g['router_accuracy'])} | {_fmt(g['abstain_rate'])} |"
            )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """eval.md: per-task table, unseen wordings, per-template scores, general set, router confusion
    matrix, error analysis."""
    lines = [
        f"# Eval of {report.get('run_dir', '')}",
        "",
        "Headline score per task (metric by kind: "
        + ", ".join(f"{k} → {v}" for k, v in PRIMARY_METRIC.items())
        + ").",
        "",
    ]
    if report.get("experts_from_registry"):
        used = ", ".join(f"{task} → `{ref}`" for task, ref in sorted(report["experts_from_registry"].items()))
        lines += [f"Experts from the registry (oracle and moe): {used}; the others from the run dir.", ""]
    lines += _score_table(report)
    lines += paired_lines(report.get("paired"))
    lines += _robustness_lines(report)
    lines += _template_lines(report)
    lines += _general_lines(report)
    lines += _router_lines(report["router"])
    lines += _error_lines(report)
    lines += _served_and_generation_lines(report)
    lines += metric_fallback_notes(report) + compute_markdown(report.get("compute"))
    return "\n".join(lines) + "\n"


def _general_lines(report: dict[str, Any]) -> list[str]:
    """eval.md section: the general (replay) set, base vs routed."""
    if not report["general"]:
        return []
    summary = report["summary"]
    lines = [
        "",
        "## General (replay) set: base vs routed (forgetting check)",
        "",
        "| set | n | base | moe | moe − base | routed to an expert |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in report["general"].items():
        base, moe = g["systems"].get("base", {}).get("score"), g["systems"].get("moe", {}).get("score")
        lines.append(
            f"| {name} | {g['n']} | {_fmt(base)} | {_fmt(moe)} | "
            f"{_fmt(summary['general_moe_minus_base'].get(name))} | {_fmt(1 - g['abstain_rate'])} |"
        )
    return lines


def _router_lines(router: dict[str, Any]) -> list[str]:
    """eval.md section: the router's confusion matrix and its error rates."""
    lines = [
        "",
        "## Router confusion (rows: true task, columns: routed to)",
        "",
        "| true \\ routed | " + " | ".join(router["columns"]) + " |",
        "|---" * (len(router["columns"]) + 1) + "|",
    ]
    lines += [
        f"| {row} | " + " | ".join(str(v) for v in counts) + " |"
        for row, counts in zip(router["rows"], router["confusion"], strict=True)
    ]
    return lines + [
        "",
        f"Wrong routes among accepted: {_fmt(router['wrong_route_rate'])}; "
        f"general prompts sent to an expert: {_fmt(router['general_routed_rate'])}.",
    ]


def _error_lines(report: dict[str, Any]) -> list[str]:
    """eval.md section: empty outputs, repetition and length ratio per task and system."""
    lines = [
        "",
        "## Error analysis (empty outputs / 3-gram repetition / length ratio to reference)",
        "",
        "| task | system | empty | repetition | length ratio |",
        "|---|---|---|---|---|",
    ]
    for name, t in {**report["tasks"], **report["general"]}.items():
        for system, m in t["systems"].items():
            lines.append(
                f"| {name} | {system} | {_fmt(m['empty_rate'])} | {_fmt(m['repetition_rate'])} "
                f"| {_fmt(m['length_ratio'])} |"
            )
    return lines


def _served_and_generation_lines(report: dict[str, Any]) -> list[str]:
    """eval.md lines: how the live endpoint agreed with eval (when scored), and generation speed."""
    lines = []
    served = report.get("served")
    if served:
        lines += [
            "",
            f"Live endpoint (`served`): {served['endpoint']} with model `{served['model']}`, "
            f"{served['requests']} requests; same route as eval's router: {_fmt(served['same_route'])}, "
            f"same answer as eval's `moe`: {_fmt(served['same_answer_as_moe'])}.",
        ]
    gen = report.get("generation", {})
    if gen:
        lines += [
            "",
            f"Generation: {gen.get('unique_requests')} unique requests for {gen.get('scored_rows')} scored "
            f"rows, {_fmt(gen.get('tokens_per_s'))} tok/s, engine start {_fmt(gen.get('startup_s'))} s.",
        ]
    return lines


def metric_fallback_notes(report: dict[str, Any]) -> list[str]:
    """One line per task whose headline is not its kind's metric (code rows without tests → ROUGE-L)."""
    notes = []
    for name, task in {**report["tasks"], **report.get("general", {})}.items():
        used = {m.get("metric") for m in task["systems"].values()} - {None, PRIMARY_METRIC.get(task["kind"])}
        if used:
            tested = max((m.get("rows_with_tests", 0) for m in task["systems"].values()), default=0)
            notes.append(
                f"- {name} ({task['kind']}): headline is {', '.join(sorted(used))}, not "
                f"{PRIMARY_METRIC.get(task['kind'])}: {tested:.0f} of {task['n']} test rows carry tests "
                "(add them with the task's eval_fields: [test_list, test_setup_code])."
            )
    return ["", "## Metric notes", "", *notes] if notes else []


def _budget_text(budget: dict[str, Any] | None) -> str:
    if not budget:
        return "budget not recorded (run predates --budget)"
    return (
        f"budget {budget.get('budget')}: {budget.get('max_steps')} steps "
        f"(experts' run: {budget.get('experts_max_steps')} steps over {budget.get('n_experts')} experts)"
    )


def compute_markdown(compute: dict[str, Any] | None) -> list[str]:
    """eval.md "Training compute" table: tokens and steps per system, tokens relative to the experts."""
    if not compute or not compute.get("systems"):
        return []
    rows = sorted(compute["systems"].items(), key=lambda item: system_rank(item[0]))
    experts_tokens = next((c["train_tokens"] for s, c in rows if s in EXPERT_SYSTEMS), None)
    lines = [
        "",
        "## Training compute",
        "",
        "| system | train tokens | optimizer steps | tokens vs experts | source |",
        "|---|---|---|---|---|",
    ]
    for system, c in rows:
        tokens, steps = c.get("train_tokens"), c.get("steps")
        ratio = tokens / experts_tokens if tokens is not None and experts_tokens else None
        source = c["source"] + (f"; {_budget_text(c.get('budget'))}" if system == "multitask" else "")
        lines.append(f"| {system} | {_count(tokens)} | {_count(steps)} | {_fmt(ratio)} | {source} |")
    if compute.get("note"):
        lines += ["", f"Note: {compute['note']}."]
    return lines


def compare_markdown(a: dict[str, Any], b: dict[str, Any], names: Sequence[str] = ("A", "B")) -> str:
    """Two evals side by side: per task and system, A, B and B − A of the headline score."""
    systems = [s for s in SYSTEM_ORDER if any(s in t["systems"] for r in (a, b) for t in r["tasks"].values())]
    tasks = list(dict.fromkeys([*a["tasks"], *b["tasks"], *a.get("general", {}), *b.get("general", {})]))
    lines = [
        f"# Compare {names[0]} = {a.get('run_dir')} vs {names[1]} = {b.get('run_dir')}",
        "",
        "| task | system | " + f"{names[0]} | {names[1]} | {names[1]} − {names[0]} |",
        "|---|---|---|---|---|",
    ]

    def score(report: dict[str, Any], task: str, system: str) -> float | None:
        entry = report["tasks"].get(task) or report.get("general", {}).get(task) or {}
        return entry.get("systems", {}).get(system, {}).get("score")

    for task in tasks:
        for system in systems:
            x, y = score(a, task, system), score(b, task, system)
            if x is None and y is None:
                continue
            delta = y - x if x is not None and y is not None else None
            lines.append(f"| {task} | {system} | {_fmt(x)} | {_fmt(y)} | {_fmt(delta)} |")
    for label, key in (("router accuracy", "accuracy"), ("abstain rate", "abstain_rate")):
        x, y = a["router"].get(key), b["router"].get(key)
        delta = y - x if x is not None and y is not None else None
        lines.append(f"| (router) | {label} | {_fmt(x)} | {_fmt(y)} | {_fmt(delta)} |")
    lines += _compare_robustness(a, b)
    return "\n".join(lines) + "\n"


def _compare_robustness(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """compare_markdown rows for unseen wordings and OOD prompts (when either eval has them)."""

    def pick(report: dict[str, Any], path: tuple[str, ...]) -> float | None:
        node: Any = report
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    rows = (
        ("router accuracy", ("unseen", "router", "accuracy")),
        ("→ base rate", ("unseen", "router", "abstain_rate")),
        ("moe/oracle", ("unseen", "summary", "moe_vs_oracle_mean")),
        ("OOD → base rate", ("ood", "to_base_rate")),
    )
    lines = []
    for label, path in rows:
        x, y = pick(a, path), pick(b, path)
        if x is None and y is None:
            continue
        delta = y - x if x is not None and y is not None else None
        lines.append(f"| (unseen wordings) | {label} | {_fmt(x)} | {_fmt(y)} | {_fmt(delta)} |")
    return lines
