"""`moea eval`'s inputs: the run's test cases (rebuilt with training's split code), its adapters (or
registered versions in their place) with their prompt specs, and its metrics.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .eval_types import OOD, TEST, UNSEEN, EvalCase, EvalError
from .prompting import PromptSpec, version_prompt_spec

if TYPE_CHECKING:
    from .config import TaskConfig
    from .data import Row


def read_run(run_dir: Path) -> dict[str, Any]:
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise EvalError(f"{run_json} not found: pass a run dir written by `moea train`")
    return json.loads(run_json.read_text())


def load_test_cases(run_dir: Path, tokenizer: Any, max_per_task: int | None = None) -> list[EvalCase]:
    """Every task's test rows, rebuilt from the run's resolved mixture.yaml (same split code as training),
    then each task's ``unseen_test_file`` rows and the mixture's ``ood_test_file`` prompts (at most
    ``max_per_task`` test and unseen rows per task)."""
    from .config_load import load_mixture
    from .data import load_mixture_data

    mixture_path = run_dir / "mixture.yaml"
    if not mixture_path.is_file():
        raise EvalError(f"{mixture_path} not found: the run dir is incomplete; retrain with `moea train`")
    config = load_mixture(mixture_path)
    data = load_mixture_data(config, tokenizer)
    cases = []
    for task in data.tasks.values():
        for split, rows in ((TEST, task.test), (UNSEEN, task.unseen)):
            kept = rows if max_per_task is None else rows[:max_per_task]
            cases += [_case(task.config, r, split) for r in kept]
    if not any(c.split == TEST for c in cases):
        raise EvalError(f"no test rows in {mixture_path}: set splits.test > 0 or give tasks a test_file")
    return cases + _ood_cases(config.ood_test_file)


def _case(task: TaskConfig, row: Row, split: str) -> EvalCase:
    index = row.template.index if row.template is not None else None
    text = task.templates[index] if index is not None and task.templates else None
    fields = (task.name, task.kind, row.prompt, row.client_messages(), row.response, task.replay, row.extra)
    return EvalCase(*fields, template=index, template_text=text, split=split)


def _ood_cases(path: Path | None) -> list[EvalCase]:
    """The mixture's out-of-distribution prompts (routed only; ``task`` = the ``category`` column or "ood")."""
    if path is None:
        return []
    from .data_sources import read_records

    records = [r for _, r in read_records(path, text_fields=("prompt",))]
    prompts = [(str(r.get("category") or OOD), r.get("prompt")) for r in records]
    return [
        EvalCase(category, "generation", p, [{"role": "user", "content": p}], "", True, split=OOD)
        for category, p in prompts
        if isinstance(p, str) and p.strip()
    ]


def expert_dirs(run_dir: Path, multitask_run: Path | None) -> tuple[dict[str, Path], Path | None]:
    experts_root = run_dir / "experts"
    experts = {p.name: p for p in sorted(experts_root.glob("*")) if (p / "adapter_config.json").is_file()}
    multitask = experts.pop("multitask", None)
    if multitask_run is not None:
        candidate = multitask_run / "experts" / "multitask"
        if not (candidate / "adapter_config.json").is_file():
            raise EvalError(
                f"{candidate} has no adapter_config.json: train it with `moea train --single-adapter`"
            )
        multitask = candidate
    return experts, multitask


def registered_experts(
    experts: dict[str, Path], expert_refs: dict[str, str], registry_url: str | None
) -> tuple[dict[str, Path], dict[str, str], dict[str, PromptSpec | None]]:
    """Swap run-dir experts for registered versions: ``{task: "name@3" | "name@prod" | "name"}``.

    Returns the adapter folders to use, per task the resolved ref (``name@version``) and the prompt spec
    recorded with that version (what the gateway applies when serving it)."""
    from registry.service import Registry

    unknown = sorted(set(expert_refs) - set(experts))
    if unknown:
        raise EvalError(
            f"--expert names task(s) {unknown} that the run has no expert for; tasks: {', '.join(sorted(experts))}"
        )
    registry = Registry(registry_url)
    try:
        used, resolved, specs = dict(experts), {}, {}
        for task, ref in expert_refs.items():
            view = registry.resolve(ref)
            used[task] = registry.artifact_path(view)
            resolved[task] = view.ref
            specs[task] = version_prompt_spec(view)
    finally:
        registry.close()
    return used, resolved, specs


def adapter_prompt_specs(run: dict[str, Any], adapters: Sequence[str]) -> dict[str, PromptSpec | None]:
    """Prompt spec of each run-dir adapter, as recorded in run.json and registered with the version."""
    tasks = run.get("tasks") or {}
    return {name: PromptSpec.from_record(tasks.get(name)) for name in adapters}


def read_metrics(run_dir: Path | None) -> dict[str, Any] | None:
    """A run dir's metrics.json, or None when there is none (or it does not parse)."""
    path = run_dir / "metrics.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
