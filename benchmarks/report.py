"""Render benchmarks/results/*.json into Markdown tables (the README's benchmark sections).

Prints the summary table; ``--write FILE`` also writes it, replacing the text between the markers
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` when FILE has them (so it can
refresh a section of a README in place), else writing the whole file. When FILE also has the
markers ``<!-- ab-simulation:start -->`` / ``<!-- ab-simulation:end -->``, the A/B simulation's
scenario table (from ``ab_simulation.json``) is refreshed there too, and between
``<!-- bench-curves:start -->`` / ``<!-- bench-curves:end -->`` the scaling curves: one table per result
file that carries a ``"curve"`` (``common.curve``), with a link to its ``<name>.png`` plot. A result's
``"moea_flags"`` (the flags the moea side ran with) are shown in its rows. The README's tables are written
only this way (tests/benchmarks checks that they match the results files)::

    python benchmarks/report.py                              # print
    python benchmarks/report.py --write README.md            # refresh the README's tables
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
AB_START, AB_END = "<!-- ab-simulation:start -->", "<!-- ab-simulation:end -->"
CURVES_START, CURVES_END = "<!-- bench-curves:start -->", "<!-- bench-curves:end -->"
AB_COLUMNS = {
    "per_request": "per request, one look (old)",
    "per_user": "per user, one look",
    "per_user_peeking": "per user, peeking at every look",
    "sequential": "sequential (mSPRT), every look",
}


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):  # counts (sizes in a curve): no decimals
        return f"{value:,}"
    if isinstance(value, int | float):
        magnitude = abs(value)
        return f"{value:,.0f}" if magnitude >= 100 else f"{value:.2f}" if magnitude >= 1 else f"{value:.3g}"
    return str(value)


def _machine(doc: dict[str, Any]) -> str:
    machine = doc.get("machine") or {}
    gpu = machine.get("gpu")
    cpu = f"{machine.get('cpu_count', '?')} CPU"
    return f"{cpu}, {gpu}" if gpu else cpu


def _commit(doc: dict[str, Any]) -> str:
    """The commit the result was measured on (``-dirty``: uncommitted changes were in the tree)."""
    return str((doc.get("machine") or {}).get("git_commit") or "?")


def rows(results_dir: Path) -> list[list[str]]:
    """One table row per summary in each result file (a file may hold ``summary`` or ``summaries``)."""
    table: list[list[str]] = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            table.append([path.stem, f"unreadable: {error}", *["–"] * 7])
            continue
        summaries = doc.get("summaries") or ([doc["summary"]] if doc.get("summary") else [])
        mode = doc.get("mode", "?")
        flags = f"; moea ran with `{doc['moea_flags']}`" if doc.get("moea_flags") else ""
        for item in summaries:
            unit = item.get("unit", "")
            met = item.get("met")
            verdict = "–" if met is None else ("✅" if met else "❌")
            target = item.get("target")
            table.append(
                [
                    f"{doc.get('benchmark', path.stem)} ({mode})",
                    f"{item.get('question', '')}{flags} [{item.get('metric', '')}, {unit}]",
                    _number(item.get("moea")),
                    f"{_number(item.get('baseline'))} ({item.get('baseline_name', 'baseline')})",
                    f"{_number(item.get('ratio'))}×",
                    f"≥ {target}×" if target is not None else "–",
                    verdict,
                    _machine(doc),
                    _commit(doc),
                ]
            )
        if not summaries:
            table.append(
                [
                    f"{doc.get('benchmark', path.stem)} ({mode})",
                    "no summary",
                    *["–"] * 5,
                    _machine(doc),
                    _commit(doc),
                ]
            )
    return table


def markdown(results_dir: Path) -> str:
    """The Markdown table of all results in ``results_dir``."""
    header = [
        "benchmark",
        "question [metric, unit]",
        "moea",
        "baseline",
        "ratio",
        "target",
        "met",
        "machine",
        "commit",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(results_dir)]
    return "\n".join(lines) + "\n"


def ab_simulation_markdown(results_dir: Path) -> str | None:
    """The A/B simulation's scenario table: rejection rate of each analysis per scenario (None: no results)."""
    path = results_dir / "ab_simulation.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    header = ["scenario", "experiments", *AB_COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, result in doc["scenarios"].items():
        rates = result["rejection_rate"]
        cells = [f"{rates[key]:.3f}" for key in AB_COLUMNS]
        lines.append(f"| {name} | {result['settings']['experiments']:,} | " + " | ".join(cells) + " |")
    source = (
        f"`{doc.get('command', '?')}`, commit {_commit(doc)}, {_machine(doc)}, {doc.get('created_at', '?')}"
    )
    return "\n".join(lines) + f"\n\n{source}\n"


def curves_markdown(results_dir: Path, image_prefix: str = "benchmarks/results/") -> str | None:
    """One table per result file with a ``"curve"`` (sizes as rows), each with its source and plot link.

    ``image_prefix`` is the path from the file the tables go into to the results folder (None: no curves)."""
    sections = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # rows() already reports it as unreadable
        table = doc.get("curve")
        if not table:
            continue
        lines = [f"**{table['title']}** ({doc.get('mode', '?')})", ""]
        lines += [
            "| " + " | ".join(table["columns"]) + " |",
            "|" + "|".join("---" for _ in table["columns"]) + "|",
        ]
        lines += ["| " + " | ".join(_number(cell) for cell in row) + " |" for row in table["rows"]]
        plot = (
            f", plot: [{path.stem}.png]({image_prefix}{path.stem}.png)"
            if path.with_suffix(".png").is_file()
            else ""
        )
        lines += ["", f"`{doc.get('command', '?')}`, commit {_commit(doc)}, {_machine(doc)}, "
                      f"load average {doc.get('load_avg_before', '?')} → {doc.get('load_avg_after', '?')}{plot}"]  # fmt: skip
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections) if sections else None


def marked_section(text: str, start: str, end: str) -> str | None:
    """What lies between the markers ``start`` and ``end`` in ``text`` (None: markers absent)."""
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].removeprefix("\n")


def _replace_section(text: str, start: str, end: str, body: str) -> str:
    before, rest = text.split(start, 1)
    return f"{before}{start}\n{body}{end}{rest.split(end, 1)[1]}"


def write(table: str, target: Path, ab_table: str | None = None, curves: str | None = None) -> None:
    """Replace the marked sections of ``target`` with ``table`` / ``ab_table`` / ``curves`` (or write the
    whole file)."""
    if target.is_file() and START in (text := target.read_text()) and END in text:
        text = _replace_section(text, START, END, table)
        if ab_table is not None and AB_START in text and AB_END in text:
            text = _replace_section(text, AB_START, AB_END, ab_table)
        if curves is not None and CURVES_START in text and CURVES_END in text:
            text = _replace_section(text, CURVES_START, CURVES_END, curves)
        target.write_text(text)
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
        results = args.results_dir.resolve()
        try:  # links to the plots, relative to the file the curves go into
            prefix = f"{results.relative_to(args.write.resolve().parent).as_posix()}/"
        except ValueError:
            prefix = f"{results.as_posix()}/"
        write(
            table,
            args.write,
            ab_simulation_markdown(args.results_dir),
            curves_markdown(args.results_dir, prefix),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
