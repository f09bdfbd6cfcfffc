"""What `moea eval` writes next to a run (eval.json, eval.md, plots, eval_outputs.jsonl) and reads back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .eval_plan import GenerationPlan
from .eval_report import render_markdown
from .eval_types import EvalCase, EvalError
from .plots import plot_reports

OUTPUTS_NAME = "eval_outputs.jsonl"
"""Every scored row with each system's answer, next to eval.json."""


def write_reports(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """eval.json + eval.md + eval_scores.png + eval_confusion.png (+ eval_unseen_scores.png) in `out_dir`
    (atomic JSON write)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(out_dir / "eval.json")
    (out_dir / "eval.md").write_text(render_markdown(report))
    return {"json": out_dir / "eval.json", "md": out_dir / "eval.md", **plot_reports(report, out_dir)}


def write_outputs(
    cases: list[EvalCase], routes: list[str | None], plan: GenerationPlan, texts: list[str], path: Path
) -> None:
    """Every scored row, one JSON line: task, the client messages, reference, route and each system's answer
    (for error analysis, and to compare eval with the live endpoint request by request)."""
    lines = []
    for i, case in enumerate(cases):
        outputs = {system: texts[ids[i]] for system, ids in plan.systems.items() if ids[i] >= 0}
        row = {"task": case.task, "messages": case.messages, "reference": case.reference, "route": routes[i]}
        lines.append(json.dumps({**row, "outputs": outputs}, ensure_ascii=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def load_eval(path: Path | str) -> dict[str, Any]:
    """eval.json of a run dir (or the file itself)."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise EvalError(f"{file} not found: run `moea eval {path}` first")
    return json.loads(file.read_text())
