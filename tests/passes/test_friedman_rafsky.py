"""The Friedman–Rafsky statistic (`passes.friedman_rafsky`), GDNT's and GOA's estimator, against scipy's minimum
spanning tree, one tree at a time and batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import pdist, squareform

from netsqueeze.passes.friedman_rafsky import cross_edges, cross_edges_batched, squared_distances


def _scipy_cross_edges(a: np.ndarray, b: np.ndarray) -> int:
    mst = minimum_spanning_tree(squareform(pdist(np.vstack([a, b])))).tocoo()
    return int(np.sum((mst.row < len(a)) != (mst.col < len(a))))


@pytest.mark.parametrize("dims", [1, 3, 16])
def test_the_cross_edges_are_those_of_scipys_minimum_spanning_tree(dims: int) -> None:
    rng = np.random.default_rng(dims)
    for shift in (0.0, 0.4, 3.0):
        a, b = rng.normal(size=(70, dims)), rng.normal(size=(90, dims)) + shift
        assert cross_edges(a, b) == _scipy_cross_edges(a, b)


def test_separated_samples_have_one_bridge_and_one_point_none() -> None:
    a = np.random.default_rng(0).normal(size=(40, 2))
    assert cross_edges(a, a + 100.0) == 1
    assert cross_edges(a[:1], a[:0]) == 0


def test_a_batch_of_trees_counts_each_as_alone() -> None:
    """Sets that share their first coordinates and differ in the last (GDNT's trees of one child group: the
    children shared, each parent channel its own): the batched counts equal each tree's own, and scipy's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    ys = torch.randn(7, 60, generator=gen, dtype=torch.float64)
    ys[2] = x[:, 0] * 3  # one set where y follows x
    dist = squared_distances(x)[None] + (ys[:, :, None] - ys[:, None, :]) ** 2
    got = cross_edges_batched(dist, 25)
    assert got.dtype == torch.int64 and got.shape == (7,)
    z = [torch.cat([x, y[:, None]], 1).numpy() for y in ys]
    assert got.tolist() == [_scipy_cross_edges(p[:25], p[25:]) for p in z]
    assert got.tolist() == [cross_edges(p[:25], p[25:]) for p in z]
