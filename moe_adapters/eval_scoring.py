"""The eval report's numbers: every system's metrics per task (test split, unseen wordings, per template),
the general (replay) set, the summary, the router's confusion matrix and the OOD prompts' routing."""

from __future__ import annotations

from typing import Any

from .eval_paired import paired_report
from .eval_plan import GenerationPlan
from .eval_types import BASE, OOD, TEST, UNSEEN, EvalCase, system_rank
from .metrics import score_task


def score_report(
    cases: list[EvalCase],
    routes: list[str | None],
    plan: GenerationPlan,
    texts: list[str],
    labels: list[str],
    serving: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The report: test split (``tasks``, ``general``, ``summary``, ``router``), then the same for the
    unseen wordings (``unseen``, None without any) and the out-of-distribution prompts (``ood``)."""
    split_rows: dict[str, list[int]] = {TEST: [], UNSEEN: [], OOD: []}
    for i, case in enumerate(cases):
        split_rows[case.split].append(i)
    report = _score_rows(cases, routes, plan, texts, labels, split_rows[TEST], serving)
    unseen = split_rows[UNSEEN]
    report["unseen"] = _score_rows(cases, routes, plan, texts, labels, unseen, serving) if unseen else None
    report["ood"] = _ood_report(cases, routes, split_rows[OOD]) if split_rows[OOD] else None
    return report


def _score_rows(
    cases: list[EvalCase],
    routes: list[str | None],
    plan: GenerationPlan,
    texts: list[str],
    labels: list[str],
    selected: list[int],
    serving: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Per-task scores, summary and router report over the ``selected`` case indices (``serving``: the
    adapter serving each task where a recipe gave it to ``shared``; default: the task's own)."""
    tasks: dict[str, Any] = {}
    general: dict[str, Any] = {}
    by_task: dict[str, list[int]] = {}
    for i in selected:
        by_task.setdefault(cases[i].task, []).append(i)
    for task, rows in by_task.items():
        kind = cases[rows[0]].kind
        label_set = sorted({cases[i].reference.strip() for i in rows}) if kind == "classification" else None
        routed = [routes[i] for i in rows]
        entry = {
            "kind": kind,
            "n": len(rows),
            "systems": _system_scores(cases, plan, texts, rows, label_set),
            "abstain_rate": sum(r is None for r in routed) / len(rows),
            "examples": _examples(cases, rows[:3], plan, texts),
        }
        if cases[rows[0]].replay:
            entry["routed_to"] = {lab: routed.count(lab) for lab in labels if routed.count(lab)}
            general[task] = entry
        else:
            entry["router_accuracy"] = sum(r == (serving or {}).get(task, task) for r in routed) / len(rows)
            if any(cases[i].template is not None for i in rows):
                entry["templates"] = _template_scores(cases, routes, plan, texts, rows, label_set, serving)
            tasks[task] = entry
    chosen_cases, chosen_routes = [cases[i] for i in selected], [routes[i] for i in selected]
    return {
        "tasks": tasks,
        "general": general,
        "summary": _summary(tasks, general),
        "router": router_report(chosen_cases, chosen_routes, labels, serving),
        "paired": paired_report(cases, plan, texts, by_task, tasks),
    }


def _system_scores(
    cases: list[EvalCase],
    plan: GenerationPlan,
    texts: list[str],
    rows: list[int],
    label_set: list[str] | None,
) -> dict[str, Any]:
    """Every system's metrics on ``rows`` (systems that skipped any of the rows are left out)."""
    references = [cases[i].reference for i in rows]
    systems = {}
    for system, request_ids in plan.systems.items():
        ids = [request_ids[i] for i in rows]
        if any(r < 0 for r in ids):
            continue
        extras = [cases[i].extra for i in rows]
        systems[system] = score_task(
            cases[rows[0]].kind, [texts[r] for r in ids], references, label_set, extras
        )
    return systems


def _template_scores(
    cases: list[EvalCase],
    routes: list[str | None],
    plan: GenerationPlan,
    texts: list[str],
    rows: list[int],
    label_set: list[str] | None,
    serving: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Per template index (as a string key, as in JSON): n, the template, each system's headline score,
    router accuracy and abstain rate over the task's rows rendered with that template."""
    groups: dict[int, list[int]] = {}
    for i in rows:
        if cases[i].template is not None:
            groups.setdefault(cases[i].template, []).append(i)
    result = {}
    for index in sorted(groups):
        members = groups[index]
        routed = [routes[i] for i in members]
        right = (serving or {}).get(cases[members[0]].task, cases[members[0]].task)
        metrics = _system_scores(cases, plan, texts, members, label_set)
        result[str(index)] = {
            "template": cases[members[0]].template_text,
            "n": len(members),
            "scores": {system: m["score"] for system, m in metrics.items()},
            "router_accuracy": sum(r == right for r in routed) / len(members),
            "abstain_rate": sum(r is None for r in routed) / len(members),
        }
    return result


def _ood_report(cases: list[EvalCase], routes: list[str | None], rows: list[int]) -> dict[str, Any]:
    """Out-of-distribution prompts: the share the router sent to the base model, overall and per category."""
    by_category: dict[str, list[int]] = {}
    for i in rows:
        by_category.setdefault(cases[i].task, []).append(i)
    routed_to: dict[str, int] = {}
    for i in rows:
        if routes[i] is not None:
            routed_to[routes[i]] = routed_to.get(routes[i], 0) + 1  # type: ignore[index]
    return {
        "n": len(rows),
        "to_base_rate": sum(routes[i] is None for i in rows) / len(rows),
        "by_category": {
            category: {
                "n": len(members),
                "to_base_rate": sum(routes[i] is None for i in members) / len(members),
            }
            for category, members in sorted(by_category.items())
        },
        "routed_to": dict(sorted(routed_to.items())),
        "examples_routed": [
            {"prompt": cases[i].prompt, "routed_to": routes[i]} for i in rows if routes[i] is not None
        ][:5],
    }


def _examples(
    cases: list[EvalCase], rows: list[int], plan: GenerationPlan, texts: list[str]
) -> list[dict[str, Any]]:
    """A few rows with every system's output, for eyeballing errors."""
    return [
        {
            "prompt": cases[i].prompt,
            "reference": cases[i].reference,
            "outputs": {s: texts[ids[i]] for s, ids in plan.systems.items() if ids[i] >= 0},
        }
        for i in rows
    ]


def _summary(tasks: dict[str, Any], general: dict[str, Any]) -> dict[str, Any]:
    """Mean headline score per system over expert tasks, and routed as % of oracle (per task + mean)."""
    systems = sorted({s for t in tasks.values() for s in t["systems"]}, key=system_rank)
    mean = {}
    for system in systems:
        scores = [t["systems"][system]["score"] for t in tasks.values() if system in t["systems"]]
        mean[system] = sum(scores) / len(scores) if scores else float("nan")
    ratio = {}
    for name, t in tasks.items():
        oracle, moe = t["systems"].get("oracle", {}).get("score"), t["systems"].get("moe", {}).get("score")
        if oracle is not None and moe is not None:
            ratio[name] = moe / oracle if oracle > 0 else (1.0 if moe == 0 else float("inf"))
    general_delta = {
        name: g["systems"]["moe"]["score"] - g["systems"]["base"]["score"]
        for name, g in general.items()
        if {"moe", "base"} <= set(g["systems"])
    }
    moe_mean, oracle_mean = mean.get("moe"), mean.get("oracle")
    return {
        "mean_score": mean,
        "moe_vs_oracle": ratio,
        "moe_vs_oracle_mean": moe_mean / oracle_mean if moe_mean is not None and oracle_mean else None,
        "general_moe_minus_base": general_delta,
    }


def router_report(
    cases: list[EvalCase], routes: list[str | None], labels: list[str], serving: dict[str, str] | None = None
) -> dict[str, Any]:
    """Confusion matrix: rows = true task (expert tasks, then replay tasks), columns = labels + base.

    A route is right when it names the adapter serving the task (``serving``; default: the task's own)."""
    right = serving or {}
    rows = sorted({c.task for c in cases if not c.replay}) + sorted({c.task for c in cases if c.replay})
    columns = [*labels, BASE]
    matrix = [[0] * len(columns) for _ in rows]
    for case, route in zip(cases, routes, strict=True):
        matrix[rows.index(case.task)][columns.index(route if route is not None else BASE)] += 1
    expert_cases = [(c, r) for c, r in zip(cases, routes, strict=True) if not c.replay]
    accepted = [(c, r) for c, r in expert_cases if r is not None]
    return {
        "rows": rows,
        "columns": columns,
        "confusion": matrix,
        "accuracy": (
            sum(right.get(c.task, c.task) == r for c, r in expert_cases) / len(expert_cases)
            if expert_cases
            else None
        ),
        "abstain_rate": sum(r is None for _, r in expert_cases) / len(expert_cases) if expert_cases else None,
        "wrong_route_rate": (
            sum(right.get(c.task, c.task) != r for c, r in accepted) / len(accepted) if accepted else None
        ),
        "general_routed_rate": (
            sum(r is not None for c, r in zip(cases, routes, strict=True) if c.replay)
            / max(1, sum(c.replay for c in cases))
        ),
    }
