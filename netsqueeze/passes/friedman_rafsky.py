"""The Friedman–Rafsky statistic: how many edges of the Euclidean minimum spanning tree over two samples a ∪ b
join a point of a to a point of b (Friedman & Rafsky, "Multivariate generalizations of the Wald–Wolfowitz and
Smirnov two-sample tests", Ann. Statist. 1979). Few cross edges: the samples lie apart; about 2|a||b|/(|a|+|b|):
they are drawn from one distribution. It is the estimator of the geometric dependency measures of GDNT (`trim`'s
`criterion = gdnt`) and of GOA (`select_features`).

One definition, used by both: Prim's algorithm on dense squared distances (the same tree as on distances),
vectorised over a batch of point sets that share their size, so that GDNT's thousands of trees (a channel × a
child group each) run as a few hundred tensor steps instead of one sparse-graph MST call each.
"""

from __future__ import annotations

import numpy as np
import torch

BATCH_BYTES = 1 << 26  # float64 distances of the trees computed at once (64 MiB) by a caller that batches them


def squared_distances(z: torch.Tensor) -> torch.Tensor:
    """[..., n, n] squared Euclidean distances between the rows of `z` [..., n, d], from the differences (exact:
    no ‖a‖² + ‖b‖² − 2a·b cancellation)."""
    return torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def cross_edges_batched(dist: torch.Tensor, na: int) -> torch.Tensor:
    """[B] int64: for each of B point sets, given as dense (squared) distances `dist` [B, n, n], the edges of its
    minimum spanning tree that join one of its first `na` points to one of the others. Prim's algorithm, all B
    trees at once: n − 1 steps, each O(B·n) (in numpy: a step is a few microseconds of overhead where a torch
    op costs several, which a single tree of a few hundred points, GOA's, would pay hundreds of times). Where
    two edges tie, the one to the lower-numbered point is taken (`argmin`'s first), so the count is
    deterministic; it is the count of every MST wherever distances differ."""
    d = dist.detach().double().numpy()
    bsz, n, _ = d.shape
    r = np.zeros(bsz, dtype=np.int64)
    if n < 2:
        return torch.from_numpy(r)
    in_a = np.arange(n) < na
    first = np.arange(bsz) * n  # tree b's point j is row first[b] + j of the flattened arrays
    rows = d.reshape(bsz * n, n)
    out = np.ones((bsz, n), dtype=bool)  # not yet in the tree
    out[:, 0] = False
    best = d[:, 0].copy()  # each point's least distance to the tree
    best[:, 0] = np.inf
    parent = np.zeros((bsz, n), dtype=np.int64)
    closer = np.empty((bsz, n), dtype=bool)
    flat_out, flat_best, flat_parent = out.reshape(-1), best.reshape(-1), parent.reshape(-1)  # views
    for _ in range(n - 1):  # in place, on flat indices: a step's overhead is what one tree of GOA's pays n times
        j = best.argmin(1)
        k = first + j
        r += in_a[j] != in_a[flat_parent[k]]
        flat_out[k] = False
        flat_best[k] = np.inf
        d_j = rows[k]
        np.less(d_j, best, out=closer)
        closer &= out
        np.copyto(best, d_j, where=closer)
        np.copyto(parent, j[:, None], where=closer)
    return torch.from_numpy(r)


def cross_edges(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> int:
    """The Friedman–Rafsky statistic of samples `a` [na, d] and `b` [nb, d] (float64)."""
    z = torch.cat([torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)])
    return int(cross_edges_batched(squared_distances(z)[None], len(a))[0])
