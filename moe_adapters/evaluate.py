"""`moea eval`: score a run's systems side by side on every task's test split.

Every system gets what ``moea serve`` returns to a client that sends the test row's messages (the user
prompt, plus any system message or earlier turns the row itself carries; never the task's system
prompt): each adapter's prompt is built by :func:`moe_adapters.prompting.expert_messages` with that
adapter's own system prompt and policy — the function the gateway calls — and greedy decoding.

- ``base``: the base model alone (no system prompt added, as for ``model=<base>``);
- ``oracle``: each task's own expert on its own task (the upper bound for routing); with keep-if-better
  (``metrics.json`` ``recipe.serving``) the adapter that serves the task, its expert or ``shared``;
- ``moe``: the learned router picks the expert; abstain → base (what `moea serve` does);
- ``random``: a uniformly random expert per prompt (what routing is worth);
- ``multitask``: one LoRA trained on all tasks, when the run (or `multitask_run`) has
  ``experts/multitask`` (served under one name, it gets no task's system prompt).

Replay tasks (mixture ``replay: true``) have no expert; they are scored as a "general" set, base vs
routed, so forgetting caused by misrouting general prompts to an expert is visible.

Robustness: a task's ``unseen_test_file`` (test rows worded with instructions no training row uses)
is scored like the test split but reported apart (``unseen``: per-task scores, routing accuracy,
routed/oracle, share sent to the base model), and the mixture's ``ood_test_file`` prompts are only
routed (``ood``: share sent to the base model). Tasks with ``templates`` also get per-template scores
(each test row in the wording drawn for it).

Generation runs vLLM's offline engine in a child process (``python -m moe_adapters.eval_generate
--worker``), because vLLM's CPU engine spawns workers and must start under a ``__main__`` guard.
Requests that several systems share (e.g. ``moe`` routed to the right expert = ``oracle``) are
generated once. The test splits are rebuilt from the run's resolved ``mixture.yaml`` with the same
deterministic split code training used.

This module runs the steps in order; each step has its module: ``eval_data`` (inputs), ``eval_plan``
(routing + requests), ``eval_generate`` (vLLM) and ``eval_endpoint`` (``served``), ``eval_scoring``,
``eval_compute`` (training compute), ``eval_report`` (markdown) and ``eval_output`` (files).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .eval_compute import training_compute
from .eval_data import (
    adapter_prompt_specs,
    expert_dirs,
    load_test_cases,
    read_metrics,
    read_run,
    registered_experts,
)
from .eval_endpoint import query_endpoint, served_report
from .eval_generate import generate
from .eval_output import OUTPUTS_NAME, write_outputs, write_reports
from .eval_plan import GenerationPlan, plan_requests, request_prompt_ids, route_cases
from .eval_report import render_markdown
from .eval_scoring import score_report
from .eval_types import EvalCase, EvalError, EvalSettings
from .prompting import PromptSpec
from .recipes import read_serving

FORMAT_VERSION = 1


def evaluate_run(
    run_dir: Path | str,
    *,
    multitask_run: Path | str | None = None,
    out_dir: Path | str | None = None,
    settings: EvalSettings | None = None,
    console: Any = None,
    expert_refs: dict[str, str] | None = None,
    registry_url: str | None = None,
) -> dict[str, Any]:
    """Score every system on every task's test split; write eval.json, eval.md and plots into `out_dir`.

    `out_dir` defaults to the run dir. `expert_refs` ({task: registry ref}) evaluates registered
    versions in place of the run's experts (oracle and moe systems), read from the registry at
    `registry_url` (default: $MOEA_REGISTRY_URL or the local one). Returns the eval.json content.
    """
    from rich.console import Console
    from transformers import AutoTokenizer

    settings = settings or EvalSettings()
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    run = read_run(run_dir)
    multitask_path = Path(multitask_run) if multitask_run else None
    experts, multitask, from_registry, specs = _choose_adapters(
        run_dir, run, multitask_path, expert_refs, registry_url
    )
    tokenizer = AutoTokenizer.from_pretrained(run["base_model"])
    cases = load_test_cases(run_dir, tokenizer, settings.max_examples_per_task)
    routes, router_meta = route_cases(run_dir, cases, experts, settings)
    serving = read_serving(read_metrics(run_dir))
    plan = plan_requests(cases, routes, experts, multitask, settings, serving)
    adapters = dict(experts) | ({"multitask": multitask} if multitask is not None else {})
    prompt_ids = request_prompt_ids(tokenizer, cases, plan.requests, specs)
    texts, generation, served = _answer(
        run["base_model"], adapters, prompt_ids, cases, routes, plan, settings, console
    )
    report = score_report(cases, routes, plan, texts, sorted(experts), serving)
    if served is not None:
        report["served"] = served
    report.update(
        {
            "format_version": FORMAT_VERSION,
            "run_dir": str(run_dir.resolve()),
            "multitask_run": str(multitask_run) if multitask_run else None,
            "experts_from_registry": from_registry,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "base_model": run["base_model"],
            "settings": json.loads(json.dumps(asdict(settings), default=str)),
            "router_meta": router_meta,
            "generation": generation,
        }
    )
    multitask_dir = multitask.parent.parent if multitask is not None else None  # RUN/experts/multitask
    report["compute"] = training_compute(run_dir, multitask_dir, list(plan.systems), from_registry)
    write_reports(report, out)
    write_outputs(cases, routes, plan, texts, out / OUTPUTS_NAME)
    console.print(render_markdown(report))
    return report


def _choose_adapters(
    run_dir: Path,
    run: dict[str, Any],
    multitask_run: Path | None,
    expert_refs: dict[str, str] | None,
    registry_url: str | None,
) -> tuple[dict[str, Path], Path | None, dict[str, str], dict[str, PromptSpec | None]]:
    """The experts (the run's, or registered versions for ``expert_refs``), the multi-task adapter, per
    task the registry ref used, and each adapter's prompt spec."""
    experts, multitask = expert_dirs(run_dir, multitask_run)
    if not experts and multitask is None:
        raise EvalError(f"{run_dir}/experts has no PEFT adapters: train the run with `moea train`")
    from_registry: dict[str, str] = {}
    specs = adapter_prompt_specs(run, [*experts, "multitask"])
    if expert_refs:
        experts, from_registry, registered_specs = registered_experts(experts, expert_refs, registry_url)
        specs.update(registered_specs)
    return experts, multitask, from_registry, specs


def _answer(
    base_model: str,
    adapters: dict[str, Path],
    prompt_ids: list[list[int]],
    cases: list[EvalCase],
    routes: list[str | None],
    plan: GenerationPlan,
    settings: EvalSettings,
    console: Any,
) -> tuple[list[str], dict[str, Any], dict[str, Any] | None]:
    """Every planned answer (vLLM), then the live endpoint's as system ``served`` (added to ``plan``):
    the texts, the ``generation`` record and the ``served`` report (None without an endpoint)."""
    n_rows = sum(sum(1 for r in ids if r >= 0) for ids in plan.systems.values())
    console.print(
        f"eval: {len(cases)} test rows, {len(plan.systems)} systems, {len(plan.requests)} unique "
        f"generations (of {n_rows}) with {len(adapters)} adapters …"
    )
    texts, stats = generate(base_model, adapters, prompt_ids, [a for a, _ in plan.requests], settings)
    served = None
    if settings.endpoint:
        served_texts, served_routes = query_endpoint(cases, settings)
        plan.systems["served"] = list(range(len(texts), len(texts) + len(cases)))
        texts = texts + served_texts
        served = served_report(cases, routes, served_routes, plan, texts, settings)
    generation = {**stats, "unique_requests": len(plan.requests), "scored_rows": n_rows}
    return texts, generation, served
