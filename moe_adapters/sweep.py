"""Per-expert hyper-parameter search (``moea train MIXTURE --sweep sweep.yaml``): the sweep file, its
search space and the results table.

A sweep file::

    method: random          # grid (every combination of the lists) or random (``trials`` draws)
    trials: 4               # random only
    seed: 0                 # random only: the draws
    params:
      lr: {min: 1.0e-4, max: 1.0e-3, log: true}   # a range (random only) or a list of values
      r: [4, 8, 16]                               # LoRA rank; lora.alpha follows at the mixture's alpha/r
      steps: [20, 40]                             # optimizer steps of one trial (its train.max_steps)
    patience: 2             # early stopping of each trial (train.patience), in evaluations
    eval_every: 5           # evaluations every this many steps (train.eval_every); null: the mixture's

Every expert gets the same trials; each trial trains that expert alone (with the mixture's replay data)
and stops early on its validation loss. The winner per expert is the trial with the lowest best
validation loss (:data:`SWEEP_METRIC`, the token-weighted response cross-entropy on the task's validation
rows that early stopping uses). :mod:`moe_adapters.sweep_run` runs the trials and writes the run dir.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moe_adapters.config_validate import build_config

SWEEP_METRIC = "best_val_loss"
"""What picks a winner: the trial's best validation loss (lower is better)."""
SWEEP_PARAMS = {"lr": float, "r": int, "steps": int}
"""Searchable parameters and their types: ``train.lr``, ``lora.r`` (``lora.alpha`` scaled along) and
``train.max_steps`` of one trial."""
MAX_TRIALS = 64
"""More trials than this per expert is an error (a sweep on a CPU machine should stay small)."""


class SweepError(ValueError):
    """The sweep file is invalid; one line naming the file and every problem."""


@dataclass
class SweepConfig:
    """A sweep file (see the module docstring)."""

    params: dict[str, Any]
    """Per parameter (``lr``, ``r``, ``steps``): a list of values, or (random only) ``{min, max, log}``."""
    method: Literal["grid", "random"] = "grid"
    """``grid``: every combination of the lists; ``random``: ``trials`` seeded draws."""
    trials: int | None = None
    """Number of random trials (required for ``random``; for ``grid`` it must be left out)."""
    seed: int = 0
    """Seed of the random draws."""
    patience: int = 2
    """Early stopping of each trial: evaluations without improvement (``train.patience``; >= 1)."""
    eval_every: int | None = None
    """Evaluate every this many steps (``train.eval_every``); None: the mixture's setting."""


@dataclass(frozen=True)
class Trial:
    """One point of the search space."""

    index: int
    lr: float
    r: int
    steps: int
    values: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        """Folder name of the trial (``trial-00``)."""
        return f"trial-{self.index:02d}"


def load_sweep(path: Path, defaults: dict[str, Any]) -> tuple[SweepConfig, list[Trial]]:
    """Read and check ``path``; return the config and its trials. ``defaults`` (``lr``, ``r``, ``steps``
    from the mixture) fill parameters the sweep does not search. Raises a one-line :class:`SweepError`."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise SweepError(f"sweep file {path}: cannot read it ({error.strerror})") from error
    except yaml.YAMLError as error:
        raise SweepError(f"sweep file {path}: invalid YAML ({str(error).splitlines()[0]})") from error
    errors: list[str] = []
    config = build_config(SweepConfig, raw, "", errors) if isinstance(raw, dict) else None
    if not isinstance(raw, dict):
        errors.append("top level must be a mapping with method and params")
    elif config is not None and not errors:
        config.params = {
            k: _yaml_floats(v) if SWEEP_PARAMS.get(k) is float else v for k, v in config.params.items()
        }
        errors += sweep_problems(config)
    if errors or config is None:
        raise SweepError(f"sweep file {path}: " + "; ".join(errors or ["invalid"]))
    return config, search_space(config, defaults)


def sweep_problems(config: SweepConfig) -> list[str]:
    """Every problem of a well-typed sweep config (empty: valid)."""
    errors = []
    unknown = sorted(set(config.params) - set(SWEEP_PARAMS))
    if unknown:
        errors.append(f"params: unknown parameter(s) {unknown}; searchable: {sorted(SWEEP_PARAMS)}")
    if not config.params:
        errors.append(f"params: give at least one of {sorted(SWEEP_PARAMS)}")
    for name, spec in config.params.items():
        if name in SWEEP_PARAMS:
            errors += [f"params.{name}: {p}" for p in _param_problems(name, spec, config.method)]
    if config.method == "random" and (config.trials is None or config.trials < 1):
        errors.append("trials: method random needs trials >= 1")
    if config.method == "grid" and config.trials is not None:
        errors.append(
            "trials: grid tries every combination of the lists; leave trials out or use method: random"
        )
    if config.patience < 1:
        errors.append(f"patience: must be >= 1 (a sweep stops trials early), got {config.patience}")
    if config.eval_every is not None and config.eval_every < 1:
        errors.append(f"eval_every: must be >= 1 or null, got {config.eval_every}")
    if not errors:
        size = grid_size(config) if config.method == "grid" else config.trials or 0
        if size > MAX_TRIALS:
            errors.append(f"{size} trials per expert; at most {MAX_TRIALS} (use fewer values or trials)")
    return errors


def _param_problems(name: str, spec: Any, method: str) -> list[str]:
    kind = SWEEP_PARAMS[name]
    if isinstance(spec, list):
        if not spec:
            return ["the list is empty"]
        bad = [v for v in spec if not _number_ok(v, kind)]
        return [f"{bad[0]!r} is not a positive {kind.__name__}"] if bad else []
    if isinstance(spec, dict):
        if method != "random":
            return ["a range {min, max} needs method: random (grid takes a list of values)"]
        extra = sorted(set(spec) - {"min", "max", "log"})
        if extra or "min" not in spec or "max" not in spec:
            return ["a range is {min: X, max: Y} with optional log: true"]
        low, high = spec["min"], spec["max"]
        if not (_number_ok(low, kind) and _number_ok(high, kind)) or low > high:
            return [f"min and max must be positive {kind.__name__}s with min <= max, got {low!r}..{high!r}"]
        if not isinstance(spec.get("log", False), bool):
            return [f"log must be true or false, got {spec['log']!r}"]
        return []
    return [f"expected a list of values or a range {{min, max}}, got {spec!r}"]


def _yaml_floats(spec: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: numbers written so become floats."""

    def number(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value

    if isinstance(spec, list):
        return [number(v) for v in spec]
    if isinstance(spec, dict):
        return {k: number(v) if k in ("min", "max") else v for k, v in spec.items()}
    return spec


def _number_ok(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int) and value >= 1
    return isinstance(value, int | float) and value > 0 and math.isfinite(value)


def grid_size(config: SweepConfig) -> int:
    """Number of grid combinations."""
    return math.prod(len(v) for v in config.params.values() if isinstance(v, list))


def search_space(config: SweepConfig, defaults: dict[str, Any]) -> list[Trial]:
    """The trials of a valid sweep: the grid in order, or ``trials`` seeded draws; parameters the sweep
    leaves out take ``defaults``."""
    names = [n for n in SWEEP_PARAMS if n in config.params]
    if config.method == "grid":
        points = [
            dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(config.params[n] for n in names))
        ]
    else:
        rng = random.Random(config.seed)
        points = [{n: _draw(rng, n, config.params[n]) for n in names} for _ in range(config.trials or 0)]
    trials = []
    for index, point in enumerate(points):
        values = {**defaults, **point}
        trials.append(
            Trial(
                index,
                float(values["lr"]),
                int(values["r"]),
                int(values["steps"]),
                values={n: point[n] for n in names},
            )
        )
    return trials


def _draw(rng: random.Random, name: str, spec: Any) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    low, high = float(spec["min"]), float(spec["max"])
    value = (
        math.exp(rng.uniform(math.log(low), math.log(high))) if spec.get("log") else rng.uniform(low, high)
    )
    return round(value) if SWEEP_PARAMS[name] is int else float(f"{value:.3g}")


def winners(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Per task, the trial index with the lowest :data:`SWEEP_METRIC` (ties: the earlier trial; trials
    without a validation loss never win)."""
    best: dict[str, tuple[float, int]] = {}
    for row in rows:
        value = row.get(SWEEP_METRIC)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if row["task"] not in best or (value, row["trial"]) < best[row["task"]]:
            best[row["task"]] = (value, row["trial"])
    return {task: trial for task, (_, trial) in best.items()}


def sweep_markdown(rows: list[dict[str, Any]], chosen: dict[str, int]) -> str:
    """The results table (sweep.md): one line per task and trial, the winner marked."""
    lines = [
        f"Winner per expert: lowest {SWEEP_METRIC} (token-weighted response cross-entropy on the task's "
        "validation rows).",
        "",
        "| task | trial | lr | r | steps | steps taken | stopped early | best val loss | winner |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        loss = row.get(SWEEP_METRIC)
        lines.append(
            f"| {row['task']} | {row['trial']} | {row['lr']:.3g} | {row['r']} | {row['steps']} | "
            f"{row['steps_taken']} | {'yes' if row['stopped_early'] else 'no'} | "
            f"{'n/a' if loss is None else f'{loss:.4f}'} | {'**yes**' if chosen.get(row['task']) == row['trial'] else ''} |"
        )
    return "\n".join(lines) + "\n"
