"""Rows: deterministic, seeded train/val/test splits that keep a training row for small tasks."""

from __future__ import annotations

import pytest

from moe_adapters.config import SplitConfig
from moe_adapters.data_rows import Row, split_rows


def test_split_is_deterministic_and_seeded():
    rows = [Row(f"p{i}", "r", f"f:line {i}") for i in range(100)]
    splits = SplitConfig(0.8, 0.1, 0.1, seed=1)
    first = split_rows(rows, splits, "task")
    assert split_rows(rows, splits, "task") == first
    assert [len(s) for s in first] == [80, 10, 10]
    assert set(map(id, first[0] + first[1] + first[2])) == set(map(id, rows))
    assert split_rows(rows, SplitConfig(0.8, 0.1, 0.1, seed=2), "task")[1] != first[1]
    assert split_rows(rows, splits, "other")[1] != first[1]


@pytest.mark.parametrize(("n", "expected"), [(1, [1, 0, 0]), (2, [1, 1, 0]), (3, [1, 1, 1]), (10, [8, 1, 1])])
def test_small_tasks_keep_a_training_row(n, expected):
    rows = [Row(f"p{i}", "r", "x") for i in range(n)]
    assert [len(s) for s in split_rows(rows, SplitConfig(), "t")] == expected
