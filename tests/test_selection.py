"""Utility-based per-class selection (this project's extension): top, band, first; determinism; errors."""

from __future__ import annotations

import pytest
import torch

from utilgen.adaptation import select_indices_per_class, select_per_class
from utilgen.data import SyntheticPool

CLASSES = ("a", "b")


def _pool(utilities: list[float], labels: list[int]) -> SyntheticPool:
    n = len(labels)
    pool = SyntheticPool.create(
        torch.rand(n, 1, 4, 4), torch.tensor(labels), CLASSES, torch.arange(n), round=0, stage="ilpo"
    )
    return pool.with_utilities(torch.tensor(utilities))


def test_top_keeps_the_highest_utilities_of_each_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    utilities = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6])
    keep = select_indices_per_class(labels, utilities, 2, mode="top")
    assert keep.tolist() == [1, 3, 6, 7]


def test_band_drops_the_lowest_fraction_then_keeps_candidate_order():
    labels = torch.tensor([0] * 6)
    utilities = torch.tensor([0.05, 0.9, 0.5, 0.01, 0.7, 0.6])
    # drop floor(1/3 * 6) = 2 lowest (indices 3 and 0); keep the first 3 survivors in order: 1, 2, 4
    keep = select_indices_per_class(labels, utilities, 3, mode="band", drop_fraction=1 / 3)
    assert keep.tolist() == [1, 2, 4]
    # drop_fraction 0: the first per_class, whatever the utilities (= mode "first")
    assert select_indices_per_class(labels, utilities, 3, mode="band").tolist() == [0, 1, 2]
    assert select_indices_per_class(labels, utilities, 3, mode="first").tolist() == [0, 1, 2]


def test_ties_are_broken_by_candidate_order():
    labels = torch.zeros(5, dtype=torch.int64)
    keep = select_indices_per_class(labels, torch.full((5,), 0.5), 2, mode="top")
    assert keep.tolist() == [0, 1]


def test_select_per_class_subsets_the_pool():
    pool = _pool([0.1, 0.9, 0.5, 0.7, 0.3, 0.2], [0, 0, 0, 1, 1, 1])
    kept = select_per_class(pool, 1, mode="top")
    assert len(kept) == 2
    assert kept.labels.tolist() == [0, 1]
    assert torch.allclose(kept.utilities, torch.tensor([0.9, 0.7]))
    assert kept.seeds.tolist() == [1, 3]


def test_errors():
    labels = torch.tensor([0, 0, 1])
    utilities = torch.tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="class 1"):
        select_indices_per_class(labels, utilities, 2)
    with pytest.raises(ValueError, match="mode"):
        select_indices_per_class(labels, utilities, 1, mode="best")
    with pytest.raises(ValueError, match="drop_fraction"):
        select_indices_per_class(labels, utilities, 1, mode="band", drop_fraction=1.0)
    with pytest.raises(ValueError, match="NaN"):
        select_indices_per_class(labels, torch.tensor([0.1, float("nan"), 0.3]), 1)
    unvalued = SyntheticPool.create(
        torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), CLASSES, torch.arange(2), round=0, stage="ilpo"
    )
    with pytest.raises(ValueError, match="utilities"):
        select_per_class(unvalued, 1)
