"""Render benchmarks/results/*.json into one Markdown table (the README's benchmark section).

Prints the table; ``--write FILE`` also writes it, replacing the text between the markers
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` when FILE has them (so it can
refresh a section of a README in place), else writing the whole file::

    python benchmarks/report.py                              # print
    python benchmarks/report.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR  # noqa: E402

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        magnitude = abs(value)
        return f"{value:,.0f}" if magnitude >= 100 else f"{value:.2f}" if magnitude >= 1 else f"{value:.3g}"
    return str(value)


def _machine(doc: dict[str, Any]) -> str:
    machine = doc.get("machine") or {}
    gpu = machine.get("gpu")
    cpu = f"{machine.get('cpu_count', '?')} CPU"
    return f"{cpu}, {gpu}" if gpu else cpu


def rows(results_dir: Path) -> list[list[str]]:
    """One table row per summary in each result file (a file may hold ``summary`` or ``summaries``)."""
    table: list[list[str]] = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            table.append([path.stem, f"unreadable: {error}", *["–"] * 6])
            continue
        summaries = doc.get("summaries") or ([doc["summary"]] if doc.get("summary") else [])
        mode = doc.get("mode", "?")
        for item in summaries:
            unit = item.get("unit", "")
            met = item.get("met")
            verdict = "–" if met is None else ("✅" if met else "❌")
            target = item.get("target")
            table.append(
                [
                    f"{doc.get('benchmark', path.stem)} ({mode})",
                    f"{item.get('question', '')} [{item.get('metric', '')}, {unit}]",
                    _number(item.get("moea")),
                    f"{_number(item.get('baseline'))} ({item.get('baseline_name', 'baseline')})",
                    f"{_number(item.get('ratio'))}×",
                    f"≥ {target}×" if target is not None else "–",
                    verdict,
                    _machine(doc),
                ]
            )
        if not summaries:
            table.append(
                [f"{doc.get('benchmark', path.stem)} ({mode})", "no summary", *["–"] * 5, _machine(doc)]
            )
    return table


def markdown(results_dir: Path) -> str:
    """The Markdown table of all results in ``results_dir``."""
    header = ["benchmark", "question [metric, unit]", "moea", "baseline", "ratio", "target", "met", "machine"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(results_dir)]
    return "\n".join(lines) + "\n"


def write(table: str, target: Path) -> None:
    """Replace the marked section of ``target`` with ``table`` (or write the whole file)."""
    if target.is_file() and START in (text := target.read_text()) and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        target.write_text(f"{before}{START}\n{table}{END}{after}")
    else:
        target.write_text(f"# Benchmark results\n\n{START}\n{table}{END}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--write", type=Path, default=None, help="File to write/refresh the table in.")
    args = parser.parse_args(argv)
    table = markdown(args.results_dir)
    print(table, end="")
    if args.write:
        write(table, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
