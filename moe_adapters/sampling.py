"""Temperature sampling across tasks: p_i ∝ min(n_i, K)^(1/T).

T = 1 gives size-proportional sampling, T → ∞ uniform; the cap K limits how much a huge task counts
before the temperature is applied (as in multilingual / multi-task mixtures such as T5 and XLM-R).
"""

from __future__ import annotations

import math
import random
from typing import Any


class SamplingError(ValueError):
    """Invalid sampling input; the message names the offending task or parameter."""


def temperature_probabilities(
    sizes: dict[str, int], temperature: float = 1.0, cap: int | None = None
) -> dict[str, float]:
    """Sampling probability per task, p_i ∝ min(n_i, cap)^(1/temperature), summing to 1.

    Raises SamplingError for temperature <= 0, an empty mixture, a cap < 1 or a task with no rows.
    """
    if not sizes:
        raise SamplingError("empty mixture: at least one task with rows is required")
    if not temperature > 0:  # also rejects NaN; +inf is allowed and means uniform
        raise SamplingError(f"temperature must be > 0, got {temperature}")
    if cap is not None and cap < 1:
        raise SamplingError(f"cap must be >= 1 or None, got {cap}")
    empty = sorted(name for name, n in sizes.items() if n <= 0)
    if empty:
        raise SamplingError(
            f"task(s) {empty} have no training rows: add data or remove them from the mixture"
        )
    capped = {name: min(n, cap) if cap is not None else n for name, n in sizes.items()}
    # Work in log space: n^(1/T) overflows for tiny T; subtracting the max keeps the largest term at 1.
    logs = {name: math.log(n) / temperature for name, n in capped.items()}
    top = max(logs.values())
    weights = {name: math.exp(v - top) for name, v in logs.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


class TaskSampler:
    """Draws the task of each training step; deterministic given a seed, resumable via state_dict.

    Removing a task (an early-stopped expert) renormalizes the remaining probabilities.
    """

    def __init__(self, probabilities: dict[str, float], seed: int = 0) -> None:
        if not probabilities:
            raise SamplingError("TaskSampler needs at least one task")
        bad = {k: v for k, v in probabilities.items() if not v >= 0 or math.isinf(v)}
        if bad or sum(probabilities.values()) <= 0:
            raise SamplingError(f"probabilities must be finite, >= 0 and not all 0, got {probabilities}")
        self.base_probabilities = dict(probabilities)
        self.active: list[str] = [k for k, v in probabilities.items() if v > 0]
        self._rng = random.Random(seed)
        self._rebuild()

    def _rebuild(self) -> None:
        total = sum(self.base_probabilities[t] for t in self.active)
        self._cumulative: list[float] = []
        acc = 0.0
        for task in self.active:
            acc += self.base_probabilities[task] / total
            self._cumulative.append(acc)

    @property
    def probabilities(self) -> dict[str, float]:
        """Current (renormalized) probabilities of the active tasks."""
        total = sum(self.base_probabilities[t] for t in self.active)
        return {t: self.base_probabilities[t] / total for t in self.active}

    def __len__(self) -> int:
        return len(self.active)

    def sample(self) -> str:
        """The next task; raises SamplingError when every task has been removed."""
        if not self.active:
            raise SamplingError("all tasks were removed from the sampler")
        u = self._rng.random()
        for task, edge in zip(self.active, self._cumulative, strict=True):
            if u < edge:
                return task
        return self.active[-1]  # u within float rounding of 1.0

    def remove(self, task: str) -> None:
        """Stop sampling ``task`` (idempotent); the others are renormalized."""
        if task not in self.base_probabilities:
            raise SamplingError(f"unknown task {task!r}; known: {sorted(self.base_probabilities)}")
        if task in self.active:
            self.active.remove(task)
            if self.active:
                self._rebuild()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact same sequence of draws."""
        version, internal, gauss = self._rng.getstate()
        return {
            "base_probabilities": dict(self.base_probabilities),
            "active": list(self.active),
            "rng_state": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self.base_probabilities = dict(state["base_probabilities"])
        self.active = list(state["active"])
        version, internal, gauss = state["rng_state"]
        self._rng.setstate((version, tuple(internal), gauss))
        if self.active:
            self._rebuild()
