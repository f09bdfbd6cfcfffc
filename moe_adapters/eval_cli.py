"""`moea eval`: the click command over :mod:`moe_adapters.evaluate` (parse, call, print)."""

from __future__ import annotations

from pathlib import Path

import click

from registry.cli import registry_url_option

from .eval_types import GENERATED_SYSTEMS as _SYSTEMS


@click.command("eval")
@click.argument("run_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--multitask",
    "multitask_run",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A second run dir whose experts/multitask is the single multi-task LoRA baseline.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where eval.json/eval.md/plots go (default: RUN_DIR).",
)
@click.option(
    "--max-examples", type=int, default=200, show_default=True, help="Test rows per task (0 = all)."
)
@click.option("--max-new-tokens", type=int, default=96, show_default=True, help="Greedy tokens per answer.")
@click.option(
    "--systems", default=",".join(_SYSTEMS), show_default=True, help="Comma-separated systems to score."
)
@click.option(
    "--expert",
    "expert_refs",
    multiple=True,
    metavar="TASK=REF",
    help="Evaluate a registered version for TASK instead of the run's expert, e.g. math=math@2 or "
    "math=math@prod (repeatable).",
)
@registry_url_option
@click.option(
    "--endpoint",
    metavar="URL",
    help="Also score a running `moea serve` (e.g. http://127.0.0.1:8000/v1) as system `served`: the same "
    "client messages, greedy, same --max-new-tokens; the report says how often it agrees with `moe`.",
)
@click.option("--endpoint-model", default="moe", show_default=True, help="model= sent to --endpoint.")
@click.option("--api-key", envvar="MOEA_API_KEY", default=None, help="Bearer token for --endpoint.")
@click.option(
    "--compare",
    nargs=2,
    type=click.Path(exists=True, path_type=Path),
    metavar="A B",
    help="Show two finished evals (run dirs or eval.json files) side by side instead.",
)
def eval_command(
    run_dir: Path | None,
    multitask_run: Path | None,
    out_dir: Path | None,
    max_examples: int,
    max_new_tokens: int,
    systems: str,
    expert_refs: tuple[str, ...],
    registry_url: str | None,
    endpoint: str | None,
    endpoint_model: str,
    api_key: str | None,
    compare: tuple[Path, Path] | None,
) -> None:
    """Score base, oracle experts, routed MoE, multi-task and random routing on RUN_DIR's test splits.

    With --expert TASK=REF, registered versions replace the run's experts (compare two evals with --compare).
    """
    from .eval_output import load_eval
    from .eval_report import compare_markdown
    from .eval_types import EvalSettings
    from .evaluate import evaluate_run

    if compare:
        a, b = (load_eval(p) for p in compare)
        click.echo(compare_markdown(a, b, names=(str(compare[0]), str(compare[1]))))
        return
    if run_dir is None:
        raise click.UsageError("give a RUN_DIR to evaluate, or --compare A B")
    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    unknown = sorted(set(chosen) - set(_SYSTEMS))
    if unknown:
        raise click.BadParameter(
            f"unknown system(s) {unknown}; choose from {', '.join(_SYSTEMS)}", param_hint="--systems"
        )
    refs = {}
    for item in expert_refs:
        task, sep, ref = item.partition("=")
        if not sep or not task.strip() or not ref.strip():
            raise click.BadParameter(f"{item!r} is not TASK=REF (e.g. math=math@2)", param_hint="--expert")
        refs[task.strip()] = ref.strip()
    settings = EvalSettings(
        max_new_tokens=max_new_tokens, max_examples_per_task=max_examples or None, systems=chosen,
        endpoint=endpoint, endpoint_model=endpoint_model, endpoint_api_key=api_key,
    )  # fmt: skip
    report = evaluate_run(
        run_dir, multitask_run=multitask_run, out_dir=out_dir, settings=settings,
        expert_refs=refs, registry_url=registry_url,
    )  # fmt: skip
    target = out_dir or run_dir
    ratio = report["summary"].get("moe_vs_oracle_mean")
    click.echo(
        f"wrote {target / 'eval.json'}, eval.md, eval_outputs.jsonl, eval_scores.png, eval_confusion.png"
        + (f"; routed = {ratio:.1%} of oracle" if ratio is not None else "")
        + _robustness_summary(report)
    )


def _robustness_summary(report: dict) -> str:
    """One clause for the unseen-wordings section and the OOD prompts, when the mixture has them."""
    parts = []
    unseen = report.get("unseen")
    if unseen:
        ratio = unseen["summary"].get("moe_vs_oracle_mean")
        parts.append(
            f"unseen wordings: routing {unseen['router']['accuracy']:.1%}"
            + (f", routed = {ratio:.1%} of oracle" if ratio is not None else "")
        )
    if report.get("ood"):
        parts.append(f"OOD prompts → base {report['ood']['to_base_rate']:.1%}")
    return "".join(f"; {p}" for p in parts)
