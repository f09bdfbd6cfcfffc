"""Sticky weighted assignment of users to the arms of an A/B experiment: the request-path part.

sha256(salt, user) picks one of :data:`NUM_BUCKETS` buckets and the arms own contiguous bucket ranges
in proportion to their weights, so a user stays on the same arm for the life of the experiment (and
across gateway replicas), while a request without a user is assigned at random.

The gateway calls :func:`assign_arm` on every request, so this module imports the standard library
only (and the registry's views for type checking): no scipy, numpy, rich or matplotlib.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry's views; any object with the same fields works
    from registry.views import ExperimentView

__all__ = [
    "NUM_BUCKETS",
    "ABError",
    "assign_arm",
    "experiment_salt",
    "parse_arm",
    "user_bucket",
    "validate_arms",
]

NUM_BUCKETS = 10_000
"""Assignment granularity: weights are honoured to 0.01 %."""


class ABError(ValueError):
    """An A/B experiment setting or request is invalid; the message says how to fix it."""


_anonymous_rng = random.Random()  # seeded from os.urandom; only for requests without a user


def parse_arm(spec: str) -> tuple[int, float]:
    """Parse a CLI arm ``"VERSION:WEIGHT"`` (e.g. ``"4:10"``) into ``(4, 10.0)``."""
    version_text, sep, weight_text = spec.partition(":")
    try:
        version, weight = int(version_text), float(weight_text)
    except ValueError:
        version, weight = -1, math.nan
    if not sep or version < 1 or not math.isfinite(weight) or weight <= 0:
        raise ABError(
            f"arm {spec!r} is not VERSION:WEIGHT with VERSION ≥ 1 and WEIGHT > 0 (example: --arm 4:10)"
        )
    return version, weight


def validate_arms(arms: Sequence[tuple[int, float]]) -> None:
    """Raise :class:`ABError` unless the arms have distinct versions and a positive total weight."""
    versions = [version for version, _ in arms]
    if len(set(versions)) != len(versions):
        raise ABError(f"arm versions must be distinct, got {versions}; give each version one --arm")
    if not arms or sum(weight for _, weight in arms) <= 0:
        raise ABError("the arms' weights must add up to more than 0 (example: --arm 3:90 --arm 4:10)")


def user_bucket(salt: str, user: str) -> int:
    """The bucket in ``[0, NUM_BUCKETS)`` of ``user`` under ``salt``: stable across processes and hosts.

    sha256 (not Python's per-process salted ``hash``) over ``salt``, a unit separator and ``user``;
    the separator keeps ``("ab", "c")`` and ``("a", "bc")`` apart. The modulo bias of a 64-bit value
    reduced to 10,000 buckets is below 1e-15.
    """
    digest = hashlib.sha256(f"{salt}\x1f{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % NUM_BUCKETS


@functools.lru_cache(maxsize=256)
def _bucket_bounds(arms: tuple[tuple[int, float], ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Upper bucket bound (exclusive) of each arm, in arm order, and the arms' versions."""
    total = sum(weight for _, weight in arms)
    if total <= 0:
        raise ABError("experiment has no arm with a positive weight; stop it and start a new one")
    bounds, cumulative = [], 0.0
    for _, weight in arms:
        cumulative += weight
        bounds.append(round(cumulative / total * NUM_BUCKETS))
    bounds[-1] = NUM_BUCKETS
    return tuple(bounds), tuple(version for version, _ in arms)


def experiment_salt(experiment: ExperimentView) -> str:
    """The salt assignment hashes with: the experiment's own, else one unique to the experiment."""
    return experiment.salt or f"{experiment.expert}:{experiment.id}"


def assign_arm(experiment: ExperimentView, user: str | None) -> int:
    """The expert version that serves ``user`` in ``experiment`` (pure and cheap: call per request).

    A user always gets the same version for a given salt and set of weights; ``None`` (or an empty
    string) means no user is known and the version is drawn at random for this request only. The
    shadow version is never returned here: it receives copies, not assignments.
    """
    arms = tuple((int(arm.version), float(arm.weight)) for arm in experiment.arms)
    bounds, versions = _bucket_bounds(arms)
    # No user: a fresh draw per request (nothing to be sticky to).
    bucket = user_bucket(experiment_salt(experiment), user) if user else _anonymous_rng.randrange(NUM_BUCKETS)
    for bound, version in zip(bounds, versions, strict=True):
        if bucket < bound:
            return version
    return versions[-1]  # unreachable: the last bound is NUM_BUCKETS
