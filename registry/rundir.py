"""Read and validate a training run dir (format_version 1, see README "Module contracts") before anything is copied."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ValidationError
from .lineage import LINEAGE_KEY, read_lineage
from .models import validate_name

RUN_FORMAT_VERSION = 1
MAX_JSON_BYTES = 16 << 20


@dataclass(frozen=True)
class ExpertPlan:
    """One expert folder of a run dir and what will be recorded with it."""

    name: str
    folder: Path
    kind: str
    system_prompt: str | None
    description: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    lineage: dict[str, Any] | None = None
    """The version this one was trained from (``moea train --dpo``; registry/lineage.py); None: none."""


@dataclass(frozen=True)
class RouterPlan:
    """The router folder of a run dir."""

    folder: Path
    encoder: str | None
    labels: list[str]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class RunPlan:
    """Everything `register_run` needs from a run dir."""

    run_dir: Path
    base_model: str
    base_model_name: str | None
    base_model_sha256: str | None
    mixture_sha256: str | None
    git_commit: str | None
    experts: list[ExpertPlan] = field(default_factory=list)
    router: RouterPlan | None = None


def read_json(path: Path, what: str) -> Any:
    """Load a JSON file with a size bound and a one-line error naming the file."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValidationError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; is it really a {what}?")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(f"{path} is missing; a run dir written by `moea train` has one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValidationError(
            f"{path} is not valid JSON ({error}); re-run `moea train` or fix the file"
        ) from None


def _task_metrics(name: str, metrics: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any]:
    result = dict((metrics.get("experts") or {}).get(name) or {})
    if evaluation:
        for key in ("tasks", "experts"):
            section = evaluation.get(key)
            if isinstance(section, dict) and isinstance(section.get(name), dict):
                result["eval"] = section[name]
                break
        else:
            if isinstance(evaluation.get(name), dict):
                result["eval"] = evaluation[name]
        headline = eval_headline(result.get("eval"))
        if headline is not None:
            result[EVAL_SCORE_KEY] = headline
    return result


EVAL_SCORE_KEY = "eval_score"
"""Key in a version's metrics of its headline score from the run's eval.json (`moea eval`, test split)."""


def eval_headline(entry: Any) -> dict[str, Any] | None:
    """The expert's headline score from its eval.json task entry: system ``oracle`` (the task's own
    expert), ``{"metric", "score", "n", "system", "split"}``; None when the entry has none."""
    oracle = ((entry or {}).get("systems") or {}).get("oracle") if isinstance(entry, dict) else None
    score = oracle.get("score") if isinstance(oracle, dict) else None
    if not isinstance(score, int | float) or isinstance(score, bool):
        return None
    n = entry.get("n", oracle.get("n", 0))  # type: ignore[union-attr]
    return {
        "metric": str(oracle.get("metric") or "score"),  # type: ignore[union-attr]
        "score": float(score),
        "n": int(n) if isinstance(n, int | float) else 0,
        "system": "oracle",
        "split": "test",
    }


def read_run_dir(run_dir: Path | str) -> RunPlan:
    """Validate `run_dir` and describe what registering it will record; raises ValidationError."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise ValidationError(f"run dir {run_dir} does not exist; pass the --out folder of `moea train`")
    run = read_json(run_dir / "run.json", "run.json")
    if not isinstance(run, dict) or run.get("format_version") != RUN_FORMAT_VERSION:
        raise ValidationError(
            f"{run_dir / 'run.json'} has format_version {run.get('format_version') if isinstance(run, dict) else None!r};"
            f" this registry reads format_version {RUN_FORMAT_VERSION}, upgrade moea or re-train"
        )
    metrics_path = run_dir / "metrics.json"
    metrics = read_json(metrics_path, "metrics file") if metrics_path.exists() else {}
    eval_path = run_dir / "eval.json"
    evaluation = read_json(eval_path, "eval file") if eval_path.exists() else None
    tasks = run.get("tasks") or {}
    experts_dir = run_dir / "experts"
    if not experts_dir.is_dir():
        raise ValidationError(
            f"{experts_dir} is missing; a run dir holds one PEFT adapter folder per task there"
        )
    plans = [
        _expert_plan(folder, tasks.get(folder.name) or {}, run, metrics, evaluation)
        for folder in sorted(experts_dir.iterdir())
        if folder.is_dir()
    ]
    if not plans:
        raise ValidationError(f"{experts_dir} holds no adapter folders; did training finish?")
    router_dir = run_dir / "router"
    router = None
    if router_dir.is_dir():
        router_json = read_json(router_dir / "router.json", "router.json")
        router = RouterPlan(
            folder=router_dir,
            encoder=router_json.get("encoder"),
            labels=[str(label) for label in router_json.get("labels") or []],
            metrics={**(metrics.get("router") or {}), **(router_json.get("metrics") or {})},
        )
    return RunPlan(
        run_dir=run_dir,
        base_model=str(run.get("base_model") or ""),
        base_model_name=run.get("base_model_name"),
        base_model_sha256=run.get("base_model_sha256"),
        mixture_sha256=run.get("mixture_sha256"),
        git_commit=run.get("git_commit"),
        experts=plans,
        router=router,
    )


def _expert_plan(
    folder: Path, task: dict[str, Any], run: dict[str, Any], metrics: dict[str, Any], evaluation: dict | None
) -> ExpertPlan:
    name = validate_name(folder.name, "expert folder name")
    adapter_config = read_json(folder / "adapter_config.json", "PEFT adapter config")
    if not any(folder.glob("adapter_model.*")):
        raise ValidationError(
            f"{folder} has no adapter_model.safetensors; the adapter was not saved completely"
        )
    lineage = read_lineage(run.get(LINEAGE_KEY), name, str(folder.parent.parent / "run.json"))
    config = {"adapter": adapter_config, "task": task, "base_model_name": run.get("base_model_name")}
    return ExpertPlan(
        name=name,
        folder=folder,
        kind=str(task.get("kind") or "generation"),
        system_prompt=task.get("system_prompt"),
        description=str(task.get("description") or ""),
        metrics=_task_metrics(name, metrics, evaluation),
        config={**config, LINEAGE_KEY: lineage} if lineage else config,
        lineage=lineage,
    )
