"""Monte-Carlo check of the A/B statistics: false-positive rate and power, thousands of experiments at once.

Each simulated experiment has ``users`` users split 50/50 by a sticky assignment. A user sends a
heavy-tailed number of requests (``1 + floor(Lomax(count_shape) · count_scale)``, capped: most users send
one or two, a few send hundreds) and has a per-user effect ``u ~ N(0, user_sd²)``; a request's reward is
``mean + u + effect·[treatment] + N(0, noise_sd²)`` (``metric="thumbs"``: a thumbs-up with probability
``expit(logit(mean) + u) + effect·[treatment]``, clipped to [0, 1]). Users arrive uniformly over the
experiment and send their later requests uniformly between their arrival and its end.

It measures, per experiment and vectorised across experiments with numpy:

- ``per_request``: the old fixed-horizon test on every request (Welch, or the two-proportion z-test for
  thumbs) at the end, ignoring that a user's requests share the user's effect;
- ``per_user``: Welch's test on per-user means at the end (what ``moea ab report`` does per user);
- ``per_user_peeking``: that same fixed test checked at every look, stopping at the first p < alpha;
- ``sequential``: the always-valid mSPRT (:mod:`serving.ab.sequential`) on per-user means checked at
  every look (from ``min_units`` units per arm on), stopping at the first ``Λ ≥ 1/alpha``.

With ``effect = 0`` the rejection rates are false-positive rates; otherwise they are power.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats

from .sequential import DEFAULT_MIXING_SD, SEQUENTIAL_MIN_UNITS, msprt_log_likelihood_ratio

__all__ = ["SimulationSettings", "simulate"]


@dataclass(frozen=True)
class SimulationSettings:
    """One batch of simulated experiments (every field is recorded with the results)."""

    experiments: int = 1000
    users: int = 400
    """Users per experiment (both arms together, split 50/50)."""
    effect: float = 0.0
    """True difference treatment − control per request (reward units, or thumbs-up rate)."""
    metric: str = "reward"
    mean: float = 0.5
    """Control mean reward (or base thumbs-up rate)."""
    user_sd: float = 0.15
    """Spread of the per-user effect (reward units; logit units for thumbs)."""
    noise_sd: float = 0.2
    """Spread of a request's reward around its user's mean (reward only)."""
    count_shape: float = 1.2
    """Lomax shape of requests per user: below 2 the variance is infinite (heavy-tailed)."""
    count_scale: float = 2.0
    max_requests: int = 500
    """Cap on requests per user."""
    looks: int = 50
    """Evenly spaced looks under monitoring (the last is the fixed horizon)."""
    min_units: int = SEQUENTIAL_MIN_UNITS
    alpha: float = 0.05
    mixing_sd: float = DEFAULT_MIXING_SD
    seed: int = 0


def _arm_moments(groups: np.ndarray, values: np.ndarray, weights: np.ndarray, n_groups: int) -> tuple:
    """Per group (experiment × arm): count, mean and sample variance of ``values`` where ``weights`` is 1."""
    n = np.bincount(groups, weights, minlength=n_groups)
    s1 = np.bincount(groups, weights * values, minlength=n_groups)
    s2 = np.bincount(groups, weights * values * values, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / n
        var = np.maximum(s2 - s1 * mean, 0.0) / (n - 1)
    return n.reshape(-1, 2), mean.reshape(-1, 2), var.reshape(-1, 2)


def _welch(n: np.ndarray, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised Welch test of arm 1 against arm 0: difference, its variance, two-sided p-value."""
    with np.errstate(divide="ignore", invalid="ignore"):
        va, vb = var[:, 0] / n[:, 0], var[:, 1] / n[:, 1]
        v = va + vb
        d = mean[:, 1] - mean[:, 0]
        df = v * v / (va * va / (n[:, 0] - 1) + vb * vb / (n[:, 1] - 1))
        p = 2 * stats.t.sf(np.abs(d) / np.sqrt(v), df)
    return d, v, np.where(np.isfinite(p), p, 1.0)


def _pooled_sd(n: np.ndarray, var: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(((n[:, 0] - 1) * var[:, 0] + (n[:, 1] - 1) * var[:, 1]) / (n[:, 0] + n[:, 1] - 2))


def _two_proportion_p(n: np.ndarray, rate: np.ndarray) -> np.ndarray:
    pooled = (n * rate).sum(axis=1) / n.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (rate[:, 1] - rate[:, 0]) / np.sqrt(pooled * (1 - pooled) * (1 / n[:, 0] + 1 / n[:, 1]))
    return np.where(np.isfinite(z), 2 * stats.norm.sf(np.abs(z)), 1.0)


def _simulate_log(s: SimulationSettings, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Users (arm, arrival, request count, effect) and their requests (user, time, value)."""
    n_users = s.experiments * s.users
    treated = rng.random(n_users) < 0.5
    counts = np.minimum(1 + np.floor(rng.pareto(s.count_shape, n_users) * s.count_scale), s.max_requests)
    counts = counts.astype(np.int64)
    user_effect = rng.normal(0.0, s.user_sd, n_users)
    arrival = rng.random(n_users)
    user_of_request = np.repeat(np.arange(n_users), counts)
    first = np.zeros(user_of_request.size, dtype=bool)
    first[np.concatenate(([0], np.cumsum(counts)[:-1]))] = True
    start = arrival[user_of_request]
    time = np.where(first, start, start + (1 - start) * rng.random(user_of_request.size))
    if s.metric == "thumbs":
        rate = special.expit(special.logit(s.mean) + user_effect) + s.effect * treated
        value = (rng.random(user_of_request.size) < np.clip(rate, 0, 1)[user_of_request]).astype(float)
    else:
        mean = s.mean + user_effect + s.effect * treated
        value = mean[user_of_request] + rng.normal(0.0, s.noise_sd, user_of_request.size)
    return {"treated": treated, "counts": counts, "user": user_of_request, "time": time, "value": value}


def _fixed_horizon(s: SimulationSettings, log: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """p-values at the end of every experiment: per request (the old test) and per user."""
    user, value, treated = log["user"], log["value"], log["treated"]
    groups = (user // s.users) * 2 + treated[user]
    n, mean, var = _arm_moments(groups, value, np.ones_like(value), 2 * s.experiments)
    per_request = _two_proportion_p(n, mean) if s.metric == "thumbs" else _welch(n, mean, var)[2]
    user_mean = np.bincount(user, value, minlength=treated.size) / log["counts"]
    user_groups = np.arange(treated.size) // s.users * 2 + treated
    n, mean, var = _arm_moments(user_groups, user_mean, np.ones_like(user_mean), 2 * s.experiments)
    return {"per_request": per_request, "per_user": _welch(n, mean, var)[2]}


def _monitored(s: SimulationSettings, log: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """First look at which each monitored test rejects (``looks`` = never), per experiment."""
    user, value, treated = log["user"], log["value"], log["treated"]
    look_of_request = np.minimum((log["time"] * s.looks).astype(np.int64), s.looks - 1)
    order = np.argsort(look_of_request, kind="stable")
    bounds = np.searchsorted(look_of_request[order], np.arange(s.looks + 1))
    user_groups = np.arange(treated.size) // s.users * 2 + treated
    sums, counts = np.zeros(treated.size), np.zeros(treated.size)
    never = np.full(s.experiments, s.looks)
    first_sequential, first_peek = never.copy(), never.copy()
    threshold = math.log(1 / s.alpha)
    for look in range(s.looks):
        batch = order[bounds[look] : bounds[look + 1]]
        sums += np.bincount(user[batch], value[batch], minlength=treated.size)
        counts += np.bincount(user[batch], minlength=treated.size)
        seen = (counts > 0).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            user_mean = np.where(counts > 0, sums / counts, 0.0)
        n, mean, var = _arm_moments(user_groups, user_mean, seen, 2 * s.experiments)
        d, v, p = _welch(n, mean, var)
        tau = s.mixing_sd * _pooled_sd(n, var)
        ready = (n >= s.min_units).all(axis=1)
        log_lr = np.where(ready, msprt_log_likelihood_ratio(d, v, tau * tau), -np.inf)
        log_lr = np.nan_to_num(log_lr, nan=-np.inf)
        first_sequential = np.where(
            (log_lr >= threshold) & (first_sequential == s.looks), look, first_sequential
        )
        peeked = ready & (p < s.alpha)
        first_peek = np.where(peeked & (first_peek == s.looks), look, first_peek)
    return {"sequential": first_sequential, "per_user_peeking": first_peek}


def simulate(settings: SimulationSettings) -> dict[str, Any]:
    """Rejection rates (false-positive rate when ``effect == 0``, else power) of each test, plus the setting.

    ``sequential_stop_median`` is the median share of the experiment's duration at which the
    sequential test stopped, among experiments where it rejected.
    """
    rng = np.random.default_rng(settings.seed)
    log = _simulate_log(settings, rng)
    fixed = _fixed_horizon(settings, log)
    monitored = _monitored(settings, log)
    alpha = settings.alpha
    stopped = monitored["sequential"][monitored["sequential"] < settings.looks]
    counts = log["counts"]
    return {
        "settings": asdict(settings),
        "requests_per_user": {
            "mean": float(counts.mean()),
            "median": float(np.median(counts)),
            "p99": float(np.percentile(counts, 99)),
            "max": int(counts.max()),
        },
        "rejection_rate": {
            "per_request": float(np.mean(fixed["per_request"] < alpha)),
            "per_user": float(np.mean(fixed["per_user"] < alpha)),
            "per_user_peeking": float(np.mean(monitored["per_user_peeking"] < settings.looks)),
            "sequential": float(np.mean(monitored["sequential"] < settings.looks)),
        },
        "sequential_stop_median": float(np.median((stopped + 1) / settings.looks)) if stopped.size else None,
    }
